//! The process-wide allocator behind the C entry points, and the Rust
//! handles to it that the Python extension uses (so that a segment
//! allocated through `segreg_alloc` is the one its Python API sees).

use std::sync::{Arc, Mutex, OnceLock};

use super::one_state;
use crate::allocator::Allocator;
use crate::backend::Backend;
use crate::real::RealBackend;
use crate::sim::SimWorld;
use crate::util::lock;

/// The process-wide allocator's type: any backend, chosen at
/// initialization.
pub type GlobalAllocator = Allocator<Box<dyn Backend>>;

/// Which backend the process-wide allocator runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Real NCCL and CUDA, loaded at run time.
    Nccl,
    /// A one-rank simulated NCCL (pointers are not dereferenceable).
    Sim,
}

impl BackendKind {
    /// The backend's name, as [`Backend::name`] gives it.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Nccl => "nccl",
            BackendKind::Sim => "sim",
        }
    }
}

/// Why the process-wide allocator could not be initialized.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InitError {
    /// It already runs on the other backend.
    #[error("already initialized with the {have} backend; one process has one backend")]
    OtherBackend {
        /// The backend it runs on.
        have: &'static str,
    },
    /// The backend could not start (CUDA or NCCL missing or too old).
    #[error("{0}")]
    Backend(String),
    /// Another copy of this library holds the process-wide allocator.
    #[error("{0}")]
    OtherCopy(String),
}

struct Global {
    alloc: GlobalAllocator,
    sim: Option<Arc<SimWorld>>,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();
/// Serializes initializations (the backend is made once).
static INIT: Mutex<()> = Mutex::new(());

/// Initializes the process-wide allocator on `kind` (what `segreg_init`
/// and `segreg_init_sim` do), or answers the one already made if it runs
/// on `kind`. Refused with a message if another backend was chosen, if
/// the backend cannot start (CUDA or NCCL missing or too old), or if
/// another copy of this library already holds its own process-wide
/// allocator in this process (see `one_state.rs`).
pub fn init(kind: BackendKind) -> Result<&'static GlobalAllocator, InitError> {
    let _serial = lock(&INIT);
    if let Some(g) = GLOBAL.get() {
        let have = g.alloc.backend().name();
        return if have == kind.name() {
            Ok(&g.alloc)
        } else {
            Err(InitError::OtherBackend { have })
        };
    }
    one_state::claim().map_err(InitError::OtherCopy)?;
    let g = match make(kind) {
        Ok(g) => g,
        Err(e) => {
            one_state::release();
            return Err(InitError::Backend(e));
        }
    };
    let g = GLOBAL.get_or_init(|| g);
    Ok(&g.alloc)
}

fn make(kind: BackendKind) -> Result<Global, String> {
    Ok(match kind {
        BackendKind::Nccl => {
            let b = RealBackend::new().map_err(|e| e.to_string())?;
            Global {
                alloc: Allocator::new(Box::new(b) as Box<dyn Backend>),
                sim: None,
            }
        }
        BackendKind::Sim => {
            let world = SimWorld::new(1);
            let rank = world.rank(0).ok_or("no rank 0")?;
            Global {
                alloc: Allocator::new(Box::new(rank) as Box<dyn Backend>),
                sim: Some(world),
            }
        }
    })
}

/// The process-wide allocator, or why there is none yet.
pub fn global_allocator() -> Result<&'static GlobalAllocator, String> {
    GLOBAL.get().map(|g| &g.alloc).ok_or_else(|| {
        "segment registry not initialized: call segreg_init (Python: segment_registry.init) first"
            .to_string()
    })
}

/// The simulated world of the process-wide allocator (its one rank), if
/// it runs on the simulated backend.
pub fn global_sim_world() -> Result<&'static Arc<SimWorld>, String> {
    GLOBAL
        .get()
        .ok_or_else(|| "segment registry not initialized".to_string())?
        .sim
        .as_ref()
        .ok_or_else(|| "not the simulated backend".to_string())
}
