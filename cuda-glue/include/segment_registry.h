/*
 * segment_registry.h: C ABI of libsegment_registry_nccl.so
 *
 * NCCL symmetric-memory allocator over a lock-free segment registry.
 * Allocation (ncclMemAlloc) only tracks a segment; registration with a
 * communicator (ncclCommWindowRegister, collective) happens in a pass that
 * every rank runs at the same point (segreg_register / segreg_register_all);
 * a free deregisters the segment's windows before ncclMemFree and never waits
 * for a pass.
 *
 * segreg_alloc / segreg_free have PyTorch's CUDAPluggableAllocator
 * signatures:
 *
 *   alloc = torch.cuda.memory.CUDAPluggableAllocator(
 *       "libsegment_registry_nccl.so", "segreg_alloc", "segreg_free")
 *   pool = torch.cuda.MemPool(alloc.allocator())
 *
 * Every function reports bad input through its return value and
 * segreg_last_error(); none aborts or unwinds. Thread-safe. That holds for
 * calls made after the calling thread's thread-locals are gone, too: glibc
 * destroys them before pthread-key destructors, atexit handlers and C++
 * static destructors run, where PyTorch frees its pools at exit. Such a
 * call works as always and its return value still tells success from
 * failure; only no error message is kept for it (see segreg_last_error).
 *
 * Kept in sync with src/capi/mod.rs by tests/header.rs.
 */
#ifndef SEGMENT_REGISTRY_H
#define SEGMENT_REGISTRY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes of segreg_window_get: one per answer. */
#define SEGREG_OK                   0  /* found: *win and *offset set */
#define SEGREG_ERR_INVALID        (-1) /* null win/offset/comm, or not initialized */
#define SEGREG_ERR_NOT_ATTACHED   (-2) /* comm not attached (never, or detached) */
#define SEGREG_ERR_NOT_TRACKED    (-3) /* no live allocation contains ptr (or freed) */
#define SEGREG_ERR_CROSSES_END    (-4) /* [ptr, ptr+size) runs past its allocation */
#define SEGREG_ERR_NOT_REGISTERED (-5) /* not registered with comm yet: run segreg_register */
#define SEGREG_ERR_NO_WINDOW      (-6) /* registered, null window: no symmetric support */
#define SEGREG_ERR_INTERNAL       (-7) /* a bug; see segreg_last_error() */

/* Identical to the CUDA runtime's definition. */
typedef struct CUstream_st *cudaStream_t;

/* Figures filled by segreg_stats (all counters since initialization). The
 * typedef is segreg_stats_t: the name segreg_stats is the function (C and
 * C++ forbid a typedef and a function of the same name). The struct only
 * grows at the end: no field is ever moved or removed. */
typedef struct segreg_stats {
    uint64_t live_segments;        /* tracked segments */
    uint64_t live_bytes;           /* bytes in tracked segments */
    uint64_t allocs;               /* successful allocations */
    uint64_t alloc_failures;       /* failed allocations */
    uint64_t frees;                /* successful frees */
    uint64_t bad_frees;            /* refused frees: null, unknown, double */
    uint64_t passes;               /* registration passes run */
    uint64_t windows_registered;   /* registrations that returned a window */
    uint64_t null_windows;         /* registrations with a null window */
    uint64_t register_failures;    /* failed registrations */
    uint64_t windows_deregistered; /* windows deregistered */
    uint64_t windows_live;         /* windows of live segments, all comms */
    uint64_t deregisters_deferred; /* deregistrations queued behind a pass */
    uint64_t handed_back;          /* windows a pass handed back */
    uint64_t deregister_failures;  /* failed deregistrations (retried) */
    uint64_t windows_stuck;        /* deregistrations waiting for a retry */
    uint64_t pending_frees;        /* freed segments not yet ncclMemFree'd */
    uint64_t mem_frees;            /* successful ncclMemFree calls */
    uint64_t mem_free_failures;    /* failed ncclMemFree calls */
    uint64_t comms_attached;       /* attached comms */
    uint64_t comms_failed;         /* attached comms marked failed */
    uint64_t sim_violations;       /* simulated backend: rule violations */
    uint64_t orphans;              /* bookkeeping with nothing to act on: 0 unless a bug */
    uint64_t agreements;           /* checked passes' agreements started */
    uint64_t diverged;             /* checked passes that ended diverged (nothing registered) */
    uint64_t agreement_failures;   /* checked passes whose agreement failed (comm failed) */
    uint64_t timeouts;             /* calls ended at their deadline by an abort */
    uint64_t stalls;               /* blocking calls past their deadline (reported only) */
    uint64_t comms_aborted;        /* comms aborted at a deadline */
    uint64_t windows_dropped;      /* windows of aborted comms, gone without an NCCL call */
} segreg_stats_t;

/* Initializes the process-wide allocator on real NCCL (>= 2.28) and the CUDA
 * driver, loaded at run time. 0 on success (also when already initialized
 * with NCCL); -1 if a library is missing, NCCL is too old, or another
 * backend was chosen. */
int segreg_init(void);

/* Initializes it on the simulated backend (one rank; pointers are not
 * dereferenceable). For tests. 0 or -1. */
int segreg_init_sim(void);

/* "nccl" or "sim"; NULL before initialization. Static string. */
const char *segreg_backend(void);

/* CUDAPluggableAllocator alloc: ncclMemAlloc(size) on `device`, then track
 * the segment. NULL on failure. `stream` is unused. */
void *segreg_alloc(size_t size, int device, cudaStream_t stream);

/* CUDAPluggableAllocator free: untrack, deregister every window, then
 * ncclMemFree once nothing covers the memory. A null, unknown or already
 * freed pointer is refused (last error set). `size`, `device` and `stream`
 * are unused. */
void segreg_free(void *ptr, size_t size, int device, cudaStream_t stream);

/* Attaches a raw ncclComm_t. Returns its id (> 0, never reused) or -1. */
int64_t segreg_attach(void *comm);

/* Registers with an attached comm every live segment it has not seen, in
 * allocation order (collective: same point on every rank). Returns the
 * number registered, or -1; a failed registration marks the comm failed
 * (only segreg_detach is allowed then). */
int segreg_register(void *comm);

/* segreg_register for every attached comm, in attach order. Returns the
 * total registered, or -1 if any comm failed (the others still ran). */
int segreg_register_all(void);

/* Deregisters every window of the comm and forgets it. Call it before
 * ncclCommDestroy. Returns the number of windows deregistered, or -1
 * (unknown comm; or some deregistrations failed: call it again). */
int segreg_detach(void *comm);

/* Window lookup, shaped like HCCL's HcclCommSymWinGet: the window that
 * `comm` registered for the allocation containing [ptr, ptr + size) and the
 * offset of ptr in it, so that a kernel reaches the tensor through NCCL's
 * device API as ncclGetLocalPointer(*win, *offset). `*win` is the
 * ncclWindow_t. Returns SEGREG_OK, or a SEGREG_ERR_* code (then *win = NULL
 * and *offset = 0 where non-null, and segreg_last_error() says why). `size`
 * may be 0. Lock-free on success (no lock, no NCCL call); thread-safe. A
 * lookup that starts after a free of the allocation never returns its
 * window. */
int segreg_window_get(void *comm, void *ptr, size_t size, void **win,
                      size_t *offset);

/* Fills *out; `size` must be sizeof(segreg_stats_t). 0 or -1. */
int segreg_stats(segreg_stats_t *out, size_t size);

/* Message of the last failed call on this thread, or NULL if that call
 * succeeded. Valid until the thread's next call. Once the thread's
 * thread-locals are gone (thread or process exit, see the top), a static
 * message saying that no message is kept, whether or not the call failed. */
const char *segreg_last_error(void);

/* Simulated backend only: a one-rank simulated comm (NULL on error). */
void *segreg_sim_comm_create(void);

/* Simulated backend only: a one-rank simulated comm without symmetric
 * support (registrations return a null window; segreg_window_get answers
 * SEGREG_ERR_NO_WINDOW). NULL on error. */
void *segreg_sim_comm_create_nosym(void);

/* Simulated backend only: destroys a simulated comm. 0 or -1. */
int segreg_sim_comm_destroy(void *comm);

/* Simulated backend only: NCCL rule violations recorded, or -1. */
int64_t segreg_sim_violations(void);

#ifdef __cplusplus
}
#endif

#endif /* SEGMENT_REGISTRY_H */
