//! The fake CUDA/NCCL of `multi-gpu/fake/fake_cuda_nccl.c`, built with `cc`
//! for tests that run the real backend on it, and the child process those
//! tests run in: the dynamic loader reads `LD_LIBRARY_PATH` only at process
//! start, so the test binary runs itself again with the fake's folder on it.
#![allow(dead_code, unreachable_pub)]

use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libloading::Library;
use segment_registry_nccl::RawComm;

/// Set in the child: the folder that holds the fake.
const CHILD_ENV: &str = "SEGREG_FAKE_NCCL_DIR";

/// How long a child may run before the parent kills it and fails.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

const SOURCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/multi-gpu/fake/fake_cuda_nccl.c"
);

/// Builds the fake into a fresh folder as `libfake.so`, linked as
/// `libcuda.so`, `libnccl.so` and `libnccl.so.2` (one object: the loader
/// maps it once, so CUDA and NCCL calls share its state).
fn build(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fake-nccl-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let lib = dir.join("libfake.so");
    let out = Command::new("cc")
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
        ])
        .arg(&lib)
        .arg(SOURCE)
        .arg("-lpthread")
        .output()
        .expect("run cc (a C compiler is needed to build the fake NCCL)");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["libcuda.so", "libnccl.so", "libnccl.so.2"] {
        std::os::unix::fs::symlink("libfake.so", dir.join(name)).unwrap();
    }
    dir
}

/// In the test process: builds the fake, runs test `test` of this binary in
/// a child with the fake's folder on `LD_LIBRARY_PATH`, asserts that the
/// child passed, and returns `false`. In that child: returns `true`, and
/// the caller runs the test's body.
pub fn in_child(test: &str) -> bool {
    if std::env::var_os(CHILD_ENV).is_some() {
        return true;
    }
    let dir = build(test);
    let (stdout, stderr) = (dir.join("child.out"), dir.join("child.err"));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &dir)
        .env("LD_LIBRARY_PATH", &dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = format!(
        "--- child stdout\n{}--- child stderr\n{}",
        std::fs::read_to_string(&stdout).unwrap_or_default(),
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    match status {
        Some(s) if s.success() => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Some(s) => panic!("child {test} failed ({s})\n{output}"),
        None => panic!("child {test} still ran after {CHILD_TIMEOUT:?}: killed\n{output}"),
    }
    false
}

type Void = unsafe extern "C" fn();
type WaitPaused = unsafe extern "C" fn(c_int) -> c_int;
type SetCount = unsafe extern "C" fn(c_int);
type Count = unsafe extern "C" fn() -> c_int;
type Total = unsafe extern "C" fn() -> usize;
type GetHandle = unsafe extern "C" fn(*mut usize) -> c_int;
type CommDevice = unsafe extern "C" fn(usize, *mut c_int) -> c_int;
type Outstanding = unsafe extern "C" fn(*mut usize, *mut usize);
type AbortStats = unsafe extern "C" fn(*mut usize, *mut usize, *mut usize);

/// The fake's test controls, in the child.
pub struct Controls {
    lib: Library,
}

impl Controls {
    /// Opens the fake (the object the real backend loaded, by inode).
    pub fn load() -> Controls {
        let dir = std::env::var_os(CHILD_ENV).expect("only in the child");
        let path = Path::new(&dir).join("libfake.so");
        // SAFETY: the fake's initializers have no preconditions; it is the
        // object already mapped as libcuda.so and libnccl.so.
        let lib = unsafe { Library::new(path) }.expect("load the fake");
        Controls { lib }
    }

    fn void(&self, name: &[u8]) {
        // SAFETY: every control called through here is `void f(void)`.
        let f = unsafe { self.lib.get::<Void>(name) }.unwrap();
        // SAFETY: no arguments; it only takes the fake's own lock.
        unsafe { f() }
    }

    /// The next `ncclMemFree` parks once its block is reusable.
    pub fn pause_next_free(&self) {
        self.void(b"fake_nccl_pause_next_free");
    }

    /// Lets a parked `ncclMemFree` return (and disarms a pause not taken).
    pub fn resume_free(&self) {
        self.void(b"fake_nccl_resume_free");
    }

    /// Waits up to `seconds` for an `ncclMemFree` to park.
    pub fn wait_paused(&self, seconds: c_int) -> bool {
        // SAFETY: the control's C prototype is `int f(int)`.
        let f = unsafe { self.lib.get::<WaitPaused>(b"fake_nccl_wait_paused") }.unwrap();
        // SAFETY: a plain value.
        unsafe { f(seconds) == 0 }
    }

    /// The next `polls` `cuStreamQuery` calls answer "not ready".
    pub fn stream_busy(&self, polls: c_int) {
        // SAFETY: the control's C prototype is `void f(int)`.
        let f = unsafe { self.lib.get::<SetCount>(b"fake_nccl_stream_busy") }.unwrap();
        // SAFETY: a plain value.
        unsafe { f(polls) }
    }

    /// `cuStreamQuery` calls still to answer "not ready".
    pub fn stream_busy_left(&self) -> c_int {
        // SAFETY: the control's C prototype is `int f(void)`.
        let f = unsafe { self.lib.get::<Count>(b"fake_nccl_stream_busy_left") }.unwrap();
        // SAFETY: no arguments; it only takes the fake's own lock.
        unsafe { f() }
    }

    /// The next comm init fails with NCCL error `rc`.
    pub fn fail_next_init(&self, rc: c_int) {
        // SAFETY: the control's C prototype is `void f(int)`.
        let f = unsafe { self.lib.get::<SetCount>(b"fake_nccl_fail_next_init") }.unwrap();
        // SAFETY: a plain value.
        unsafe { f(rc) }
    }

    /// `(streams, buffers)` made by `cuStreamCreate` and `cuMemAlloc` and
    /// not destroyed or freed.
    pub fn cuda_outstanding(&self) -> (usize, usize) {
        let (mut streams, mut buffers) = (0, 0);
        // SAFETY: the control's C prototype is `void f(size_t *, size_t *)`.
        let f = unsafe { self.lib.get::<Outstanding>(b"fake_cuda_outstanding") }.unwrap();
        // SAFETY: two valid out-pointers.
        unsafe { f(&mut streams, &mut buffers) };
        (streams, buffers)
    }

    /// `ncclCommDestroy` calls that freed a comm, so far.
    pub fn comms_destroyed(&self) -> usize {
        // SAFETY: the control's C prototype is `size_t f(void)`.
        let f = unsafe { self.lib.get::<Total>(b"fake_nccl_comms_destroyed") }.unwrap();
        // SAFETY: no arguments; it only takes the fake's own lock.
        unsafe { f() }
    }

    /// The calling thread's current context (`cuCtxGetCurrent`; 0: none).
    pub fn current_context(&self) -> usize {
        let mut ctx: usize = 0;
        // SAFETY: the fake's prototype is `CUresult f(CUcontext *)`.
        let f = unsafe { self.lib.get::<GetHandle>(b"cuCtxGetCurrent") }.unwrap();
        // SAFETY: a valid out-pointer of a pointer's size.
        assert_eq!(unsafe { f(&mut ctx) }, 0);
        ctx
    }

    /// The device a comm was made on (`ncclCommCuDevice`).
    pub fn comm_device(&self, comm: RawComm) -> c_int {
        let mut device = -1;
        // SAFETY: the fake's prototype is `int f(const fake_comm *, int *)`.
        let f = unsafe { self.lib.get::<CommDevice>(b"ncclCommCuDevice") }.unwrap();
        // SAFETY: a live comm of the fake and a valid out-pointer.
        assert_eq!(unsafe { f(comm.0, &mut device) }, 0);
        device
    }

    /// `(bytes, blocks)` allocated by `ncclMemAlloc` and not freed.
    pub fn outstanding(&self) -> (usize, usize) {
        let (mut bytes, mut blocks) = (0, 0);
        // SAFETY: the control's C prototype is `void f(size_t *, size_t *)`.
        let f = unsafe { self.lib.get::<Outstanding>(b"fake_nccl_outstanding") }.unwrap();
        // SAFETY: two valid out-pointers.
        unsafe { f(&mut bytes, &mut blocks) };
        (bytes, blocks)
    }

    /// The next collective never completes: a non-blocking comm's answers
    /// `ncclInProgress` until its abort; a blocking one's waits for
    /// [`release_stalls`](Self::release_stalls).
    pub fn stall_next(&self) {
        self.void(b"fake_nccl_stall_next");
    }

    /// Ends a stalled call on a blocking comm (with an error).
    pub fn release_stalls(&self) {
        self.void(b"fake_nccl_release_stalls");
    }

    /// `(ncclCommAbort calls, calls on a comm after its abort, windows
    /// freed by aborts)`.
    pub fn abort_stats(&self) -> (usize, usize, usize) {
        let (mut a, mut b, mut c) = (0, 0, 0);
        // SAFETY: the control's C prototype is
        // `void f(size_t *, size_t *, size_t *)`.
        let f = unsafe { self.lib.get::<AbortStats>(b"fake_nccl_abort_stats") }.unwrap();
        // SAFETY: three valid out-pointers.
        unsafe { f(&mut a, &mut b, &mut c) };
        (a, b, c)
    }

    /// Resumes a parked free when dropped, so that a failing test ends
    /// instead of waiting for a thread that never returns.
    pub fn resume_on_drop(&self) -> ResumeOnDrop<'_> {
        ResumeOnDrop(self)
    }
}

/// See [`Controls::resume_on_drop`].
pub struct ResumeOnDrop<'a>(&'a Controls);

impl Drop for ResumeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.resume_free();
    }
}
