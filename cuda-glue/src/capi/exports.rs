//! The C entry points as exported symbols, defined by a macro so that the
//! crate that *links* this one can export them.
//!
//! A cdylib exports the `#[no_mangle]` functions it defines, but not
//! reliably those of a dependency (the linker drops objects nothing
//! references). So the functions of [`capi`](crate::capi) are plain Rust
//! items, and [`export_c_abi!`](crate::export_c_abi) defines the exported
//! `segreg_*` symbols, each calling its [`capi`](crate::capi) function, in
//! whichever crate expands it: this crate's own cdylib (feature
//! `c-exports`, on by default) or the Python extension (which turns the
//! feature off). The list is written once, in
//! [`__segreg_entry_points!`](crate::__segreg_entry_points); the
//! header test checks it against the header, and the Python package's
//! export test checks the installed module with `nm -D`.

/// Calls `$then!` with every C entry point: `safe` or `unsafe`, its name
/// and its signature. The one list of the C ABI's functions.
#[doc(hidden)]
#[macro_export]
macro_rules! __segreg_entry_points {
    ($then:ident) => {
        $crate::$then! {
            safe segreg_init() -> ::std::ffi::c_int;
            safe segreg_init_sim() -> ::std::ffi::c_int;
            safe segreg_backend() -> *const ::std::ffi::c_char;
            safe segreg_alloc(
                size: usize, device: ::std::ffi::c_int, stream: $crate::capi::CudaStream
            ) -> *mut ::std::ffi::c_void;
            safe segreg_free(
                ptr: *mut ::std::ffi::c_void, size: usize, device: ::std::ffi::c_int,
                stream: $crate::capi::CudaStream
            ) -> ();
            safe segreg_attach(comm: *mut ::std::ffi::c_void) -> i64;
            safe segreg_attach_checked(comm: *mut ::std::ffi::c_void, deadline_ms: i64) -> i64;
            unsafe segreg_attach_nonblocking(
                comm: *mut ::std::ffi::c_void, checked: ::std::ffi::c_int, deadline_ms: i64,
                abort: ::std::option::Option<$crate::capi::SegregAbortFn>,
                ctx: *mut ::std::ffi::c_void
            ) -> i64;
            safe segreg_register(comm: *mut ::std::ffi::c_void) -> ::std::ffi::c_int;
            unsafe segreg_register_status(
                comm: *mut ::std::ffi::c_void, registered: *mut usize
            ) -> ::std::ffi::c_int;
            safe segreg_abstain(comm: *mut ::std::ffi::c_void) -> ::std::ffi::c_int;
            safe segreg_register_all() -> ::std::ffi::c_int;
            safe segreg_detach(comm: *mut ::std::ffi::c_void) -> ::std::ffi::c_int;
            unsafe segreg_window_get(
                comm: *mut ::std::ffi::c_void, ptr: *mut ::std::ffi::c_void, size: usize,
                win: *mut *mut ::std::ffi::c_void, offset: *mut usize
            ) -> ::std::ffi::c_int;
            unsafe segreg_stats(
                out: *mut $crate::capi::SegregStats, size: usize
            ) -> ::std::ffi::c_int;
            safe segreg_last_error() -> *const ::std::ffi::c_char;
            safe segreg_sim_comm_create() -> *mut ::std::ffi::c_void;
            safe segreg_sim_comm_create_nosym() -> *mut ::std::ffi::c_void;
            safe segreg_sim_comm_create_nonblocking() -> *mut ::std::ffi::c_void;
            safe segreg_sim_stall_next_register(comm: *mut ::std::ffi::c_void) -> ::std::ffi::c_int;
            safe segreg_sim_comm_abort(comm: *mut ::std::ffi::c_void) -> ::std::ffi::c_int;
            safe segreg_sim_comm_destroy(comm: *mut ::std::ffi::c_void) -> ::std::ffi::c_int;
            safe segreg_sim_violations() -> i64;
        }
    };
}

/// Defines the exported C entry points of `include/segment_registry.h`
/// (and the one-state probe, `segment_registry_state_probe`) in the crate
/// that expands it, each calling the function of the same name in
/// [`capi`](crate::capi). Expand it once per shared library, in a private
/// module, and only in a crate that depends on this one with
/// `default-features = false` (else the symbols are defined twice):
///
/// ```ignore
/// mod c_abi {
///     segment_registry_nccl::export_c_abi!();
/// }
/// ```
#[macro_export]
macro_rules! export_c_abi {
    () => {
        $crate::__segreg_entry_points!(__segreg_define_entry_points);

        /// The one-state probe (see `capi/one_state.rs` in
        /// segment-registry-nccl): the address of this copy's claim flag.
        #[no_mangle]
        #[allow(unreachable_pub)]
        pub extern "C" fn segment_registry_state_probe() -> *const ::std::ffi::c_void {
            $crate::capi::state_probe()
        }
    };
}

/// [`export_c_abi!`]'s work: one exported function per entry point.
#[doc(hidden)]
#[macro_export]
macro_rules! __segreg_define_entry_points {
    ($($kind:ident $name:ident ($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty;)*) => {
        $($crate::__segreg_define_entry_points!(@one $kind $name ($($arg: $ty),*) -> $ret);)*
    };
    (@one safe $name:ident ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[doc = concat!("The C entry point `", stringify!($name), "` (see the header).")]
        #[no_mangle]
        #[allow(unreachable_pub)]
        pub extern "C" fn $name($($arg: $ty),*) -> $ret {
            $crate::capi::$name($($arg),*)
        }
    };
    (@one unsafe $name:ident ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[doc = concat!("The C entry point `", stringify!($name), "` (see the header).")]
        ///
        /// # Safety
        /// As the function of the same name in `segment_registry_nccl::capi`.
        #[no_mangle]
        #[allow(unreachable_pub)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            // SAFETY: the caller's guarantee, which is the wrapped
            // function's.
            unsafe { $crate::capi::$name($($arg),*) }
        }
    };
}

/// [`ENTRY_POINTS`](crate::capi::ENTRY_POINTS)'s work: the names.
#[doc(hidden)]
#[macro_export]
macro_rules! __segreg_entry_point_names {
    ($($kind:ident $name:ident ($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty;)*) => {
        &[$(stringify!($name)),*]
    };
}

#[cfg(feature = "c-exports")]
mod defined {
    crate::export_c_abi!();
}
