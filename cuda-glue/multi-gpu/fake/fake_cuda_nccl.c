/*
 * fake_cuda_nccl.c: a stand-in for libcuda and libnccl on a machine
 * without GPUs: for a dry run of the two-process plumbing (dry-run.sh),
 * and for the tests that run the real backend on it
 * (tests/real_on_fake.rs).
 *
 * NOT a simulation of NCCL's rules (the simulated backend in src/sim.rs is
 * that). It only lets segment-registry-two-ranks and run-two-ranks.sh run
 * end to end: "device memory" is host memory, ranks are processes that
 * meet through files in $FAKE_NCCL_DIR (default /tmp), and the collective
 * calls (ncclCommInitRank, ncclCommWindowRegister, ncclAllReduce) wait for
 * every rank of the comm, like the real ones. A registration whose size
 * differs between ranks fails with ncclInvalidUsage where real NCCL would
 * hang. One file is both libraries: link it as libcuda.so, libnccl.so and
 * libnccl.so.2 (the dynamic loader maps it once, so they share state).
 *
 * ncclMemAlloc hands back the block freed last first (as cuMem's address
 * reuse does), and a test can park the next ncclMemFree after it has given
 * its block back (fake_nccl_pause_next_free and friends, at the end), so
 * that another thread's ncclMemAlloc lands inside that free, and can ask
 * what is still allocated (fake_nccl_outstanding).
 *
 * Non-blocking comms (ncclCommInitRankConfig or ncclCommSplit with
 * config.blocking = 0): every call on one does its work inside the call
 * (waiting for peers like a blocking one); init and finalize then answer
 * ncclInProgress, and the grouped calls (register, all-reduce, split)
 * answer ncclSuccess, as NCCL 2.28.9 does; either way the comm stays "in
 * progress" until the next ncclCommGetAsyncError, which says ncclSuccess,
 * and a registration's window is written only by that poll. That exercises
 * the caller's polling; it is not NCCL's asynchrony. A test can make the next
 * collective never complete (fake_nccl_stall_next): on a non-blocking comm
 * ncclCommGetAsyncError then says ncclInProgress until ncclCommAbort; on a
 * blocking one the call waits until fake_nccl_release_stalls. A peer that
 * never makes a collective call fails the call after WAIT_SECONDS; with
 * $FAKE_NCCL_PEER_WAIT_MS set, a non-blocking comm's call is instead left in
 * progress after that many milliseconds, as NCCL leaves it. ncclCommAbort
 * frees the comm's windows and keeps the comm's memory, marked, so that
 * any later call on it (a use after free in NCCL) is counted
 * (fake_nccl_abort_stats). ncclAllReduce knows float sums and uint64 max;
 * ncclCommSplit knows one color per call site (NCCL_SPLIT_NOCOLOR gives
 * no comm); from a non-blocking parent it answers success with the child
 * still NULL, and writes the child at the parent's next
 * ncclCommGetAsyncError, which still says ncclInProgress (what NCCL 2.28.9
 * did on the H200). A collective call on a non-blocking comm whose last
 * call was not polled to ncclSuccess is refused, as NCCL refuses it. The CUDA side adds streams (always idle: work is done inside
 * the call) and cuMemAlloc (host memory).
 *
 *   cc -shared -fPIC -O2 -o libfake.so fake_cuda_nccl.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define GRANULARITY (2u << 20)
#define TOTAL_MEM (80ull << 30)
#define WAIT_SECONDS 60
#define MAX_ALLOCS 4096
#define MAX_SPARE 64

/* ---------------------------------------------------------------- CUDA */

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;

static char contexts[16];
static __thread CUcontext current;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static size_t allocated;

static int device_count(void) {
    const char *v = getenv("CUDA_VISIBLE_DEVICES");
    if (v && *v) {
        int n = 1;
        for (; *v; v++) n += *v == ',';
        return n;
    }
    v = getenv("FAKE_GPUS");
    return v ? atoi(v) : 2;
}

CUresult cuInit(unsigned flags) { (void)flags; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = device_count(); return 0; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count() || ordinal >= 16) return 101; /* invalid device */
    *d = ordinal;
    return 0;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { *c = &contexts[d]; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { (void)d; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) { (void)attr; (void)d; *v = 0; return 0; }
CUresult cuCtxSetCurrent(CUcontext c) { current = c; return 0; }
CUresult cuCtxGetCurrent(CUcontext *c) { *c = current; return 0; }
CUresult cuCtxSynchronize(void) { return 0; }
CUresult cuMemGetInfo_v2(size_t *free_, size_t *total) {
    pthread_mutex_lock(&mu);
    *total = TOTAL_MEM;
    *free_ = TOTAL_MEM - allocated;
    pthread_mutex_unlock(&mu);
    return 0;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    memcpy((void *)(uintptr_t)dst, src, n);
    return 0;
}
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    memcpy(dst, (const void *)(uintptr_t)src, n);
    return 0;
}
typedef void *CUstream;
/* Streams and cuMemAlloc buffers not destroyed or freed yet. */
static size_t live_streams, live_buffers;
CUresult cuStreamCreate(CUstream *s, unsigned flags) {
    (void)flags;
    *s = malloc(1);
    if (!*s) return 2; /* out of memory */
    pthread_mutex_lock(&mu);
    live_streams++;
    pthread_mutex_unlock(&mu);
    return 0;
}
CUresult cuStreamDestroy_v2(CUstream s) {
    free(s);
    pthread_mutex_lock(&mu);
    live_streams--;
    pthread_mutex_unlock(&mu);
    return 0;
}
/* Polls of cuStreamQuery still to answer CUDA_ERROR_NOT_READY (set by
 * fake_nccl_stream_busy): a stream whose work has not finished. */
static int stream_busy_polls;
CUresult cuStreamQuery(CUstream s) {
    (void)s;
    pthread_mutex_lock(&mu);
    int busy = stream_busy_polls > 0;
    if (busy) stream_busy_polls--;
    pthread_mutex_unlock(&mu);
    return busy ? 600 /* CUDA_ERROR_NOT_READY */ : 0;
}
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    void *m = calloc(1, n ? n : 1);
    if (!m) return 2;
    *p = (CUdeviceptr)(uintptr_t)m;
    pthread_mutex_lock(&mu);
    live_buffers++;
    pthread_mutex_unlock(&mu);
    return 0;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    free((void *)(uintptr_t)p);
    pthread_mutex_lock(&mu);
    live_buffers--;
    pthread_mutex_unlock(&mu);
    return 0;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s) {
    (void)s;
    memcpy((void *)(uintptr_t)dst, src, n);
    return 0;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s) {
    (void)s;
    memcpy(dst, (const void *)(uintptr_t)src, n);
    return 0;
}
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = "fake CUDA error"; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; *s = "CUDA_ERROR_FAKE"; return 0; }

/* ---------------------------------------------------------------- NCCL */

typedef struct { char internal[128]; } ncclUniqueId;
typedef struct fake_window fake_window;
typedef struct fake_comm fake_comm;
struct fake_comm {
    int nranks, rank, device;
    char tag[33];      /* hex of the id's random part: names the comm's files */
    unsigned long seq; /* collective calls so far */
    int windows;
    fake_window *first; /* live windows */
    int blocking;       /* 0: non-blocking (config.blocking = 0) */
    int aborted;        /* ncclCommAbort ran: any later call is a use after free */
    int pending;        /* non-blocking: 1 a call answered ncclInProgress, 2 it never completes */
    unsigned long splits; /* children split off so far: names them */
    fake_comm *next_aborted; /* the list of aborted comms (see ncclCommAbort) */
    fake_comm **split_out;   /* non-blocking parent: where the split's child goes, */
    fake_comm *split_child;  /* written when a poll of the parent completes it */
    fake_window **win_out;   /* non-blocking: where a registration's window goes, */
    fake_window *win_ready;  /* written by the next ncclCommGetAsyncError */
};
struct fake_window { fake_comm *comm; void *ptr; size_t size; fake_window *next; };
/* The prefix of ncclConfig_t that the fake reads. */
typedef struct { size_t size; unsigned magic, version; int blocking; } fake_config;

enum {
    ncclSuccess = 0, ncclSystemError = 2, ncclInvalidArgument = 4, ncclInvalidUsage = 5,
    ncclInProgress = 7
};
enum { ncclUint64 = 5, ncclFloat32 = 7, ncclSum = 0, ncclMax = 2 };

static struct { void *ptr; size_t size; } allocs[MAX_ALLOCS];
static char last_error[256];

static const char *dir(void) {
    const char *d = getenv("FAKE_NCCL_DIR");
    return d && *d ? d : "/tmp";
}

/* 2.28.9, or FAKE_NCCL_VERSION (to test the version check). */
int ncclGetVersion(int *v) {
    const char *e = getenv("FAKE_NCCL_VERSION");
    *v = e && *e ? atoi(e) : 22809;
    return 0;
}
const char *ncclGetErrorString(int rc) {
    switch (rc) {
    case 0: return "no error";
    case ncclSystemError: return "fake: system error (a peer did not come)";
    case ncclInvalidArgument: return "fake: invalid argument";
    case ncclInvalidUsage: return "fake: invalid usage (ranks disagree)";
    default: return "fake: error";
    }
}
const char *ncclGetLastError(void *comm) { (void)comm; return last_error; }

int ncclGetUniqueId(ncclUniqueId *id) {
    memset(id, 0, sizeof *id);
    memcpy(id->internal, "FAKE", 4);
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd < 0 || read(fd, id->internal + 4, 16) != 16) {
        if (fd >= 0) close(fd);
        return ncclSystemError;
    }
    close(fd);
    return 0;
}

/* Writes `len` bytes to <dir>/<tag>.<seq>.<rank> atomically. */
static int publish(const fake_comm *c, unsigned long seq, const void *data, size_t len) {
    char path[512], tmp[600];
    snprintf(path, sizeof path, "%s/fake-nccl-%s.%lu.%d", dir(), c->tag, seq, c->rank);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return ncclSystemError;
    size_t w = fwrite(data, 1, len, f);
    if (fclose(f) != 0 || w != len || rename(tmp, path) != 0) return ncclSystemError;
    /* Every rank has read call seq - 2 by now (it published seq - 1 after
     * reading all of seq - 2, and this rank read all of seq - 1): drop it. */
    if (seq >= 2) {
        snprintf(path, sizeof path, "%s/fake-nccl-%s.%lu.%d", dir(), c->tag, seq - 2, c->rank);
        unlink(path);
    }
    return 0;
}

/* What collect() returns when a non-blocking call is left in progress. */
#define FAKE_LEFT_IN_PROGRESS (-1000)

/* Milliseconds on a monotonic clock. */
static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Reads rank r's contribution to call `seq`, waiting for it: WAIT_SECONDS,
 * then the call fails. On a non-blocking comm with $FAKE_NCCL_PEER_WAIT_MS
 * set, a peer that has not called after that long leaves the call in
 * progress until ncclCommAbort (FAKE_LEFT_IN_PROGRESS): what NCCL shows of
 * a peer that never makes the call. */
static int collect(fake_comm *c, unsigned long seq, int r, void *data, size_t len) {
    char path[512];
    snprintf(path, sizeof path, "%s/fake-nccl-%s.%lu.%d", dir(), c->tag, seq, r);
    const char *peer_wait = c->blocking ? NULL : getenv("FAKE_NCCL_PEER_WAIT_MS");
    long long end = now_ms() + (peer_wait && *peer_wait ? atoll(peer_wait) : WAIT_SECONDS * 1000LL);
    for (;;) {
        FILE *f = fopen(path, "rb");
        if (f) {
            size_t got = fread(data, 1, len, f);
            fclose(f);
            if (got != len) {
                snprintf(last_error, sizeof last_error,
                         "rank %d sent %zu bytes for call %lu, expected %zu", r, got, seq, len);
                return ncclInvalidUsage;
            }
            return 0;
        }
        if (now_ms() > end) {
            if (peer_wait && *peer_wait) {
                c->pending = 2;
                return FAKE_LEFT_IN_PROGRESS;
            }
            snprintf(last_error, sizeof last_error, "rank %d never made call %lu", r, seq);
            return ncclSystemError;
        }
        usleep(1000);
    }
}

/* Test controls' state for stalls and aborts (see the end); guarded by mu. */
static int stall_armed;
static unsigned long stall_epoch;
static size_t aborts, calls_after_abort, windows_freed_by_abort;
static pthread_cond_t stall_cv = PTHREAD_COND_INITIALIZER;

/* 0 if `c` may be used; else counts a use after abort and returns an error. */
static int check_live(const fake_comm *c) {
    if (!c) return ncclInvalidArgument;
    if (!c->aborted) return 0;
    pthread_mutex_lock(&mu);
    calls_after_abort++;
    pthread_mutex_unlock(&mu);
    snprintf(last_error, sizeof last_error, "call on a comm after ncclCommAbort");
    return ncclInvalidUsage;
}

/* check_live, and for a collective call also that the comm's previous call
 * was polled to ncclSuccess: NCCL refuses a non-blocking comm's next call
 * until then (NCCL 2.28.9 on the H200, docs/gpu-runs 2026-12-04). */
static int check_ready(const fake_comm *c) {
    int rc = check_live(c);
    if (rc || (!c->pending && !c->split_child)) return rc;
    snprintf(last_error, sizeof last_error,
             "Attempt to use communicator before the previous operation returned ncclSuccess");
    return ncclInvalidUsage;
}

/* Consumes an armed stall. On a non-blocking comm the call then answers
 * ncclInProgress for ever (until abort): returns 1. On a blocking one it
 * waits for fake_nccl_release_stalls and fails: returns -1. */
static int take_stall(fake_comm *c) {
    pthread_mutex_lock(&mu);
    int armed = stall_armed;
    stall_armed = 0;
    if (armed && c->blocking) {
        unsigned long epoch = stall_epoch;
        while (stall_epoch == epoch) pthread_cond_wait(&stall_cv, &mu);
    }
    pthread_mutex_unlock(&mu);
    if (!armed) return 0;
    if (c->blocking) {
        snprintf(last_error, sizeof last_error, "stalled call released by the test");
        return -1;
    }
    c->pending = 2;
    return 1;
}

/* The answer of an init or finalize that completed: ncclInProgress on a
 * non-blocking comm (the next poll says success), else success. */
static int done(fake_comm *c) {
    if (c->blocking) return ncclSuccess;
    c->pending = 1;
    return ncclInProgress;
}

/* The answer of a grouped call (register, all-reduce) that completed: as
 * NCCL 2.28.9, ncclSuccess also on a non-blocking comm, whose next poll
 * then says success (NCCL drops the group end's ncclInProgress, so the
 * caller has to poll after a success too). */
static int grouped_done(fake_comm *c) {
    if (!c->blocking) c->pending = 1;
    return ncclSuccess;
}

/* Whether `config` asks for a non-blocking comm. */
static int wants_nonblocking(const void *config) {
    const fake_config *cfg = config;
    return cfg && cfg->magic == 0xcafebeef && cfg->blocking == 0;
}

/* The code the next comm init fails with (fake_nccl_fail_next_init), or 0. */
static int fail_next_init;

int ncclCommInitRank(fake_comm **out, int nranks, ncclUniqueId id, int rank) {
    pthread_mutex_lock(&mu);
    int fail = fail_next_init;
    fail_next_init = 0;
    pthread_mutex_unlock(&mu);
    if (fail) return fail;
    if (nranks < 1 || rank < 0 || rank >= nranks || memcmp(id.internal, "FAKE", 4) != 0)
        return ncclInvalidArgument;
    fake_comm *c = calloc(1, sizeof *c);
    if (!c) return ncclSystemError;
    c->nranks = nranks;
    c->rank = rank;
    c->blocking = 1;
    c->device = current ? (int)((char *)current - contexts) : 0;
    for (int i = 0; i < 16; i++)
        sprintf(c->tag + 2 * i, "%02x", (unsigned char)id.internal[4 + i]);
    int me = nranks, other;
    int rc = publish(c, c->seq, &me, sizeof me);
    for (int r = 0; rc == 0 && r < nranks; r++) {
        rc = collect(c, c->seq, r, &other, sizeof other);
        if (rc == 0 && other != nranks) rc = ncclInvalidUsage;
    }
    c->seq++;
    if (rc) { free(c); return rc; }
    *out = c;
    return 0;
}

int ncclCommInitRankConfig(fake_comm **out, int nranks, ncclUniqueId id, int rank, void *config) {
    int rc = ncclCommInitRank(out, nranks, id, rank);
    if (rc || !wants_nonblocking(config)) return rc;
    (*out)->blocking = 0;
    return done(*out);
}

/* Frees the windows still on `c`. */
static void free_windows(fake_comm *c) {
    while (c->first) {
        fake_window *w = c->first;
        c->first = w->next;
        free(w);
        c->windows--;
        pthread_mutex_lock(&mu);
        windows_freed_by_abort++;
        pthread_mutex_unlock(&mu);
    }
}

/* ncclCommDestroy calls that freed a comm. */
static size_t comms_destroyed;

int ncclCommDestroy(fake_comm *c) {
    int rc = check_live(c);
    if (rc) return rc;
    pthread_mutex_lock(&mu);
    comms_destroyed++;
    pthread_mutex_unlock(&mu);
    while (c->first) {
        fake_window *w = c->first;
        c->first = w->next;
        free(w);
    }
    free(c);
    return 0;
}
/* Aborted comms: kept (never freed) so that a later call on one is seen as
 * a use after abort, and reachable from here so that LeakSanitizer, in a
 * test process that loads the fake, does not report them. */
static fake_comm *aborted_comms;

/* Frees the comm's windows; the comm's memory stays (marked aborted). */
int ncclCommAbort(fake_comm *c) {
    int rc = check_live(c);
    if (rc) return rc;
    c->aborted = 1;
    free_windows(c);
    pthread_mutex_lock(&mu);
    aborts++;
    c->next_aborted = aborted_comms;
    aborted_comms = c;
    pthread_mutex_unlock(&mu);
    return 0;
}
int ncclCommFinalize(fake_comm *c) {
    int rc = check_ready(c);
    return rc ? rc : done(c);
}
int ncclCommGetAsyncError(fake_comm *c, int *state) {
    int rc = check_live(c);
    if (rc) return rc;
    if (c->split_child) {
        /* The split of this non-blocking parent completes now: NCCL writes
         * the child's handle only then. */
        *c->split_out = c->split_child;
        c->split_child = NULL;
        /* The poll that completes it still says "in progress": the
         * caller has to poll the parent again to read success. */
        c->pending = 1;
        *state = ncclInProgress;
        return 0;
    }
    if (c->win_ready) {
        /* NCCL writes a non-blocking registration's window from its own
         * thread, before the poll that says success. */
        *c->win_out = c->win_ready;
        c->win_ready = NULL;
    }
    *state = c->pending == 2 ? ncclInProgress : ncclSuccess;
    if (c->pending == 1) c->pending = 0;
    return 0;
}
int ncclCommCount(const fake_comm *c, int *n) {
    int rc = check_live(c);
    if (rc == 0) *n = c->nranks;
    return rc;
}
int ncclCommUserRank(const fake_comm *c, int *r) {
    int rc = check_live(c);
    if (rc == 0) *r = c->rank;
    return rc;
}
int ncclCommCuDevice(const fake_comm *c, int *d) {
    int rc = check_live(c);
    if (rc == 0) *d = c->device;
    return rc;
}

/* Collective on `parent`: every rank gives (color, key); the ranks of one
 * color form a child, ordered by key then parent rank. */
int ncclCommSplit(fake_comm *parent, int color, int key, fake_comm **out, void *config) {
    int rc = check_ready(parent);
    if (rc || !out) return rc ? rc : ncclInvalidArgument;
    unsigned long seq = parent->seq++;
    int mine[2] = {color, key}, theirs[2];
    rc = publish(parent, seq, mine, sizeof mine);
    int n = 0, pos = 0;
    for (int r = 0; rc == 0 && r < parent->nranks; r++) {
        rc = collect(parent, seq, r, theirs, sizeof theirs);
        if (rc || color < 0 || theirs[0] != color) continue;
        n++;
        if (theirs[1] < key || (theirs[1] == key && r < parent->rank)) pos++;
    }
    if (rc == FAKE_LEFT_IN_PROGRESS) { *out = NULL; return ncclSuccess; } /* child never written */
    if (rc) return rc;
    unsigned long nth = parent->splits++;
    if (color < 0) { *out = NULL; return 0; }
    fake_comm *c = calloc(1, sizeof *c);
    if (!c) return ncclSystemError;
    c->nranks = n;
    c->rank = pos;
    c->device = parent->device;
    c->blocking = config ? !wants_nonblocking(config) : parent->blocking;
    snprintf(c->tag, sizeof c->tag, "%.16s%08lx%08x", parent->tag, nth, (unsigned)color);
    if (!parent->blocking) {
        /* As NCCL 2.28.9 did on the H200 (docs/gpu-runs, 2026-12-04): a
         * non-blocking parent's split answers success with the child still
         * NULL; the handle appears once the split completes (here: at the
         * parent's next ncclCommGetAsyncError). */
        *out = NULL;
        parent->split_out = out;
        parent->split_child = c;
        return ncclSuccess;
    }
    *out = c;
    return done(c);
}

/* Freed blocks kept for reuse, the last freed on top. */
static struct { void *ptr; size_t size; } spare[MAX_SPARE];
static int nspare;

/* The topmost spare block of `len` bytes, taken off the stack, or NULL.
 * Caller holds mu. */
static void *take_spare(size_t len) {
    for (int i = nspare - 1; i >= 0; i--) {
        if (spare[i].size != len) continue;
        void *p = spare[i].ptr;
        memmove(&spare[i], &spare[i + 1], (size_t)(nspare - 1 - i) * sizeof spare[0]);
        nspare--;
        return p;
    }
    return NULL;
}

/* Keeps a freed block for reuse; the bottom one goes back to the C heap
 * when the stack is full. Caller holds mu. */
static void keep_spare(void *p, size_t len) {
    if (nspare == MAX_SPARE) {
        free(spare[0].ptr);
        memmove(&spare[0], &spare[1], (MAX_SPARE - 1) * sizeof spare[0]);
        nspare--;
    }
    spare[nspare].ptr = p;
    spare[nspare].size = len;
    nspare++;
}

/* The test controls' state (see the end of the file); guarded by mu. */
static pthread_cond_t pause_cv = PTHREAD_COND_INITIALIZER;
static int pause_armed, pause_parked, pause_released;

/* Parks the calling ncclMemFree if a test armed the pause. Caller holds mu. */
static void maybe_park(void) {
    if (!pause_armed) return;
    pause_armed = 0;
    pause_parked = 1;
    pause_released = 0;
    pthread_cond_broadcast(&pause_cv);
    while (!pause_released) pthread_cond_wait(&pause_cv, &mu);
    pause_parked = 0;
    pthread_cond_broadcast(&pause_cv);
}

int ncclMemAlloc(void **ptr, size_t size) {
    if (!size) return ncclInvalidArgument;
    size_t len = (size + GRANULARITY - 1) / GRANULARITY * GRANULARITY;
    pthread_mutex_lock(&mu);
    int slot = -1;
    for (int i = 0; i < MAX_ALLOCS && slot < 0; i++)
        if (!allocs[i].ptr) slot = i;
    void *p = slot < 0 ? NULL : take_spare(len);
    if (slot >= 0 && !p && posix_memalign(&p, GRANULARITY, len) != 0) p = NULL;
    if (p) {
        allocs[slot].ptr = p;
        allocs[slot].size = len;
        allocated += len;
    }
    pthread_mutex_unlock(&mu);
    if (!p) return ncclSystemError;
    *ptr = p;
    return 0;
}

int ncclMemFree(void *ptr) {
    pthread_mutex_lock(&mu);
    int found = 0;
    for (int i = 0; i < MAX_ALLOCS; i++)
        if (allocs[i].ptr == ptr) {
            allocated -= allocs[i].size;
            keep_spare(ptr, allocs[i].size);
            allocs[i].ptr = NULL;
            found = 1;
            break;
        }
    /* The block is reusable now: a parked free lets another thread's
     * ncclMemAlloc get it back before this call returns. */
    if (found) maybe_park();
    pthread_mutex_unlock(&mu);
    return found ? 0 : ncclInvalidArgument;
}

/* Collective: every rank registers a buffer of the same size. */
int ncclCommWindowRegister(fake_comm *c, void *buff, size_t size, fake_window **win, int flags) {
    (void)flags;
    int rc0 = check_ready(c);
    if (rc0 || !win) return rc0 ? rc0 : ncclInvalidArgument;
    int stalled = take_stall(c);
    if (stalled) return stalled > 0 ? ncclInProgress : ncclSystemError;
    unsigned long seq = c->seq++;
    uint64_t mine = size, theirs;
    int rc = publish(c, seq, &mine, sizeof mine);
    for (int r = 0; rc == 0 && r < c->nranks; r++) {
        rc = collect(c, seq, r, &theirs, sizeof theirs);
        if (rc == 0 && theirs != mine) {
            snprintf(last_error, sizeof last_error,
                     "call %lu: rank %d registers %llu bytes, rank %d %llu", seq, c->rank,
                     (unsigned long long)mine, r, (unsigned long long)theirs);
            rc = ncclInvalidUsage;
        }
    }
    if (rc == FAKE_LEFT_IN_PROGRESS) return ncclSuccess; /* grouped: the poll says in progress */
    if (rc) return rc;
    fake_window *w = malloc(sizeof *w);
    if (!w) return ncclSystemError;
    w->comm = c;
    w->ptr = buff;
    w->size = size;
    w->next = c->first;
    c->first = w;
    c->windows++;
    if (c->blocking) {
        *win = w;
    } else {
        *win = NULL;
        c->win_out = win;
        c->win_ready = w;
    }
    return grouped_done(c);
}

int ncclCommWindowDeregister(fake_comm *c, fake_window *w) {
    int rc = check_ready(c);
    if (rc || !w || w->comm != c) return rc ? rc : ncclInvalidArgument;
    fake_window **at = &c->first;
    while (*at && *at != w) at = &(*at)->next;
    if (!*at) return ncclInvalidArgument;
    *at = w->next;
    c->windows--;
    free(w);
    /* Not a grouped call in NCCL: done when it returns, also non-blocking. */
    return ncclSuccess;
}

/* Collective: a sum of floats (ncclFloat32, ncclSum) or a max of uint64
 * (ncclUint64, ncclMax). */
int ncclAllReduce(const void *src, void *dst, size_t count, int dtype, int op, fake_comm *c,
                  void *stream) {
    (void)stream;
    int floats = dtype == ncclFloat32 && op == ncclSum;
    int words = dtype == ncclUint64 && op == ncclMax;
    int rc = check_ready(c);
    if (rc || (!floats && !words)) return rc ? rc : ncclInvalidArgument;
    int stalled = take_stall(c);
    if (stalled) return stalled > 0 ? ncclInProgress : ncclSystemError;
    unsigned long seq = c->seq++;
    size_t elem = floats ? sizeof(float) : sizeof(uint64_t), bytes = count * elem;
    rc = publish(c, seq, src, bytes);
    if (rc) return rc;
    unsigned char *acc = calloc(count ? count : 1, elem), *part = malloc(bytes ? bytes : 1);
    if (!acc || !part) { free(acc); free(part); return ncclSystemError; }
    for (int r = 0; rc == 0 && r < c->nranks; r++) {
        rc = collect(c, seq, r, part, bytes);
        for (size_t i = 0; rc == 0 && i < count; i++) {
            if (floats) {
                float a, b;
                memcpy(&a, acc + i * elem, elem);
                memcpy(&b, part + i * elem, elem);
                a += b;
                memcpy(acc + i * elem, &a, elem);
            } else {
                uint64_t a, b;
                memcpy(&a, acc + i * elem, elem);
                memcpy(&b, part + i * elem, elem);
                if (b > a) memcpy(acc + i * elem, &b, elem);
            }
        }
    }
    if (rc == 0) memcpy(dst, acc, bytes);
    free(acc);
    free(part);
    if (rc == FAKE_LEFT_IN_PROGRESS) return ncclSuccess; /* grouped: the poll says in progress */
    return rc ? rc : grouped_done(c);
}

/* ------------------------------------------------------- test controls */

/* Arms the pause: the next ncclMemFree that finds its block waits, after
 * the block is reusable, until fake_nccl_resume_free. */
void fake_nccl_pause_next_free(void) {
    pthread_mutex_lock(&mu);
    pause_armed = 1;
    pthread_mutex_unlock(&mu);
}

/* Waits until an ncclMemFree is parked: 0, or -1 after `seconds`. */
int fake_nccl_wait_paused(int seconds) {
    struct timespec end;
    clock_gettime(CLOCK_REALTIME, &end);
    end.tv_sec += seconds;
    pthread_mutex_lock(&mu);
    int rc = 0;
    while (!pause_parked && rc == 0) rc = pthread_cond_timedwait(&pause_cv, &mu, &end);
    int parked = pause_parked;
    pthread_mutex_unlock(&mu);
    return parked ? 0 : -1;
}

/* Lets a parked ncclMemFree return and disarms a pause not taken yet. */
void fake_nccl_resume_free(void) {
    pthread_mutex_lock(&mu);
    pause_armed = 0;
    pause_released = 1;
    pthread_cond_broadcast(&pause_cv);
    pthread_mutex_unlock(&mu);
}

/* Bytes and blocks allocated by ncclMemAlloc and not freed. */
void fake_nccl_outstanding(size_t *bytes, size_t *blocks) {
    pthread_mutex_lock(&mu);
    size_t n = 0;
    for (int i = 0; i < MAX_ALLOCS; i++) n += allocs[i].ptr != NULL;
    *bytes = allocated;
    *blocks = n;
    pthread_mutex_unlock(&mu);
}

/* Arms a stall: the next collective (ncclCommWindowRegister,
 * ncclAllReduce) on any comm never completes: on a non-blocking comm it
 * answers ncclInProgress until ncclCommAbort; on a blocking one it waits
 * for fake_nccl_release_stalls, then fails. */
void fake_nccl_stall_next(void) {
    pthread_mutex_lock(&mu);
    stall_armed = 1;
    pthread_mutex_unlock(&mu);
}

/* Ends a stalled call on a blocking comm (with an error), and disarms a
 * stall not taken yet. */
void fake_nccl_release_stalls(void) {
    pthread_mutex_lock(&mu);
    stall_armed = 0;
    stall_epoch++;
    pthread_cond_broadcast(&stall_cv);
    pthread_mutex_unlock(&mu);
}

/* ncclCommAbort calls, calls on a comm after its abort (use after free in
 * NCCL), and windows freed by aborts. */
void fake_nccl_abort_stats(size_t *n_aborts, size_t *after_abort, size_t *windows_freed) {
    pthread_mutex_lock(&mu);
    *n_aborts = aborts;
    *after_abort = calls_after_abort;
    *windows_freed = windows_freed_by_abort;
    pthread_mutex_unlock(&mu);
}

/* The next `polls` cuStreamQuery calls answer CUDA_ERROR_NOT_READY. */
void fake_nccl_stream_busy(int polls) {
    pthread_mutex_lock(&mu);
    stream_busy_polls = polls;
    pthread_mutex_unlock(&mu);
}

/* cuStreamQuery calls still to answer CUDA_ERROR_NOT_READY. */
int fake_nccl_stream_busy_left(void) {
    pthread_mutex_lock(&mu);
    int n = stream_busy_polls;
    pthread_mutex_unlock(&mu);
    return n;
}

/* The next ncclCommInitRank or ncclCommInitRankConfig fails with `rc`. */
void fake_nccl_fail_next_init(int rc) {
    pthread_mutex_lock(&mu);
    fail_next_init = rc;
    pthread_mutex_unlock(&mu);
}

/* Streams made by cuStreamCreate and buffers by cuMemAlloc, not destroyed
 * or freed yet. */
void fake_cuda_outstanding(size_t *streams, size_t *buffers) {
    pthread_mutex_lock(&mu);
    *streams = live_streams;
    *buffers = live_buffers;
    pthread_mutex_unlock(&mu);
}

/* ncclCommDestroy calls that freed a comm, so far. */
size_t fake_nccl_comms_destroyed(void) {
    pthread_mutex_lock(&mu);
    size_t n = comms_destroyed;
    pthread_mutex_unlock(&mu);
    return n;
}
