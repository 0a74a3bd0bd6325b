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
 * Checked comms (cuda-glue/NEVER_HANG.md): a comm attached with
 * segreg_attach_checked or segreg_attach_nonblocking gets passes whose
 * ranks agree, over a private comm split from it at attach, on what they
 * will register before they register it; a disagreement is
 * SEGREG_ERR_DIVERGED on every rank with nothing registered. Its calls end
 * by a deadline (SEGREG_DEADLINE_MS, default 10 minutes): a non-blocking
 * comm is aborted there through its owner's hook, a blocking one is only
 * reported. Two rules: a comm's registrations (and a checked comm's attach
 * and detach) are issued from the thread that issues that group's
 * collectives, at the same program point on every rank. The functions
 * segreg_attach and segreg_register keep their behaviour: no agreement,
 * no new collective.
 *
 *   int64_t id = segreg_attach_checked(comm, 0);     // collective
 *   ...allocate...
 *   size_t n;
 *   int rc = segreg_register_status(comm, &n);        // collective
 *   if (rc == SEGREG_ERR_DIVERGED) {
 *       // nothing registered on any rank; segreg_last_error() says, e.g.:
 *       // "... this rank has 3 pending segments (6 MiB); the group has 2
 *       // to 3; free or allocate so every rank matches, then register
 *       // again". Free or allocate, then call it again on every rank.
 *   } else if (rc == SEGREG_ERR_TIMEOUT || rc == SEGREG_ERR_ABORTED) {
 *       segreg_detach(comm);  // no NCCL call; the comm is gone
 *   }
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

/* Return codes of segreg_window_get (-1 to -7), segreg_register_status and
 * segreg_abstain (-1, -2, -7 and -8 to -14): one per answer. */
#define SEGREG_OK                   0  /* found: *win and *offset set */
#define SEGREG_ERR_INVALID        (-1) /* null win/offset/comm, or not initialized */
#define SEGREG_ERR_NOT_ATTACHED   (-2) /* comm not attached (never, or detached) */
#define SEGREG_ERR_NOT_TRACKED    (-3) /* no live allocation contains ptr (or freed) */
#define SEGREG_ERR_CROSSES_END    (-4) /* [ptr, ptr+size) runs past its allocation */
#define SEGREG_ERR_NOT_REGISTERED (-5) /* not registered with comm yet: run segreg_register */
#define SEGREG_ERR_NO_WINDOW      (-6) /* registered, null window: no symmetric support */
#define SEGREG_ERR_INTERNAL       (-7) /* a bug; see segreg_last_error() */
#define SEGREG_ERR_DIVERGED       (-8) /* checked: ranks disagree; nothing registered, comm healthy */
#define SEGREG_ERR_TIMEOUT        (-9) /* a call reached its deadline: comm aborted, windows gone */
#define SEGREG_ERR_ABORTED       (-10) /* comm aborted earlier: detach it (no NCCL call) */
#define SEGREG_ERR_FAILED        (-11) /* comm failed (a registration failed): detach it */
#define SEGREG_ERR_BUSY          (-12) /* a pass already runs on the comm */
#define SEGREG_ERR_AGREEMENT     (-13) /* checked: the agreement failed or timed out; comm failed */
#define SEGREG_ERR_NOT_CHECKED   (-14) /* segreg_abstain on a comm not attached checked */

/* Identical to the CUDA runtime's definition. */
typedef struct CUstream_st *cudaStream_t;

/* The owner's abort of a borrowed non-blocking comm (segreg_attach_nonblocking):
 * called with the comm and the ctx given at attach, by the thread whose call
 * on the comm reached its deadline. Returns 0 once the comm is aborted
 * (ncclCommAbort); anything else: not aborted, the call goes on waiting and
 * the stall is reported. Must not throw. */
typedef int (*segreg_abort_fn)(void *comm, void *ctx);

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

/* Attaches a raw ncclComm_t checked, as borrowed and blocking (PyTorch's):
 * its passes agree before they register. Collective (it splits a private
 * comm from `comm`): call it at the same point on every rank, on the thread
 * that issues the comm's collectives. deadline_ms > 0 bounds every
 * collective call on it (else SEGREG_DEADLINE_MS, else 10 minutes); being
 * blocking, the comm is never aborted: a call past its deadline is
 * reported (stderr, stats.stalls, segreg_last_error). Returns the id or
 * -1 (a rank that did not attach too makes the others fail at the
 * deadline). */
int64_t segreg_attach_checked(void *comm, int64_t deadline_ms);

/* Attaches the application's non-blocking ncclComm_t (ncclConfig_t.blocking
 * = 0), checked if `checked` != 0 (then collective, as above). Every call on
 * it is polled by the calling thread; at its deadline that thread calls
 * abort(comm, ctx) (the glue never calls ncclCommAbort on it) and the comm
 * is treated as gone: that call answers SEGREG_ERR_TIMEOUT, later ones
 * SEGREG_ERR_ABORTED, and its windows leave the accounting without NCCL
 * calls (NCCL freed them); every segment is still freed once. `abort` must
 * be callable from any thread until detach. Returns the id or -1 (also for
 * a null abort). */
int64_t segreg_attach_nonblocking(void *comm, int checked, int64_t deadline_ms,
                                  segreg_abort_fn abort, void *ctx);

/* Registers with an attached comm every live segment it has not seen, in
 * allocation order (collective: same point on every rank). Returns the
 * number registered, or -1; a failed registration marks the comm failed
 * (only segreg_detach is allowed then). On a checked comm the ranks first
 * agree on what they will register; segreg_register_status tells the
 * outcomes apart. */
int segreg_register(void *comm);

/* segreg_register with one code per outcome: SEGREG_OK and *registered (if
 * non-null) set to the number registered, or SEGREG_ERR_DIVERGED (checked:
 * nothing registered on any rank, comm healthy: free or allocate so every
 * rank matches, then call it again on every rank), SEGREG_ERR_TIMEOUT,
 * SEGREG_ERR_ABORTED, SEGREG_ERR_FAILED, SEGREG_ERR_AGREEMENT,
 * SEGREG_ERR_BUSY, SEGREG_ERR_NOT_ATTACHED or SEGREG_ERR_INVALID;
 * segreg_last_error() says what happened in words. */
int segreg_register_status(void *comm, size_t *registered);

/* Checked comm: takes part in the pass without registering (this rank
 * cannot register now, e.g. inside a CUDA graph capture): call it where
 * segreg_register_status would be called; every rank's pass then fails at
 * once with SEGREG_ERR_DIVERGED instead of waiting for this one. Returns
 * that code (expected), or SEGREG_ERR_NOT_CHECKED, SEGREG_ERR_BUSY, ... */
int segreg_abstain(void *comm);

/* segreg_register for every attached comm, in attach order. Returns the
 * total registered, or -1 if any comm failed (the others still ran). */
int segreg_register_all(void);

/* Deregisters every window of the comm and forgets it. Call it before
 * ncclCommDestroy (a checked comm: at the same point on every rank; its
 * private comm is destroyed here). An aborted comm is detached without any
 * NCCL call and must not be destroyed (NCCL freed it). Returns the number
 * of windows deregistered, or -1 (unknown comm; or some deregistrations
 * failed: call it again). */
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

/* Simulated backend only: a one-rank non-blocking simulated comm (its calls
 * honour deadlines and may be aborted). NULL on error. */
void *segreg_sim_comm_create_nonblocking(void);

/* Simulated backend only: the comm's next registration never completes
 * until the comm is aborted (a lost rendezvous). 0 or -1. */
int segreg_sim_stall_next_register(void *comm);

/* Simulated backend only: ncclCommAbort of a simulated comm, as an owner's
 * abort hook would call it. 0 or -1. */
int segreg_sim_comm_abort(void *comm);

/* Simulated backend only: destroys a simulated comm. 0 or -1. */
int segreg_sim_comm_destroy(void *comm);

/* Simulated backend only: NCCL rule violations recorded, or -1. */
int64_t segreg_sim_violations(void);

#ifdef __cplusplus
}
#endif

#endif /* SEGMENT_REGISTRY_H */
