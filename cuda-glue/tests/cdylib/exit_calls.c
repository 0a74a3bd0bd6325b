/*
 * exit_calls.c: C ABI calls made after the calling thread's thread-locals
 * are gone, as PyTorch makes them when it frees its pools at interpreter
 * exit. glibc destroys a thread's thread-locals before its pthread-key
 * destructors run, and the main thread's before the atexit handlers.
 *
 *   exit_calls <path of libsegment_registry_nccl.so> atexit|key-destructor
 *
 * Loads the library (dlopen, as CUDAPluggableAllocator does) on the
 * simulated backend, allocates and registers one segment on one thread
 * (so that the library's thread-locals there exist, and are destroyed),
 * and from that thread's exit checks what the calls answer: the segment
 * is found and freed, a double free is refused, a new allocation works.
 * Exit status 0; 3 (with a message) for a wrong answer; a call that aborts
 * kills the process (SIGABRT).
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "segment_registry.h"

#define MIB ((size_t)1 << 20)

static struct {
    int (*init_sim)(void);
    void *(*alloc)(size_t, int, cudaStream_t);
    void (*free)(void *, size_t, int, cudaStream_t);
    int64_t (*attach)(void *);
    int (*reg)(void *);
    int (*window_get)(void *, void *, size_t, void **, size_t *);
    int (*stats)(segreg_stats_t *, size_t);
    const char *(*last_error)(void);
    void *(*comm_create)(void);
} api;

static void *comm;
static void *segment;
static volatile int checked;

static void *sym(void *lib, const char *name) {
    void *p = dlsym(lib, name);
    if (!p) {
        fprintf(stderr, "exit_calls: %s missing: %s\n", name, dlerror());
        exit(2);
    }
    return p;
}

static void load(const char *path) {
    void *lib = dlopen(path, RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "exit_calls: %s\n", dlerror());
        exit(2);
    }
    *(void **)&api.init_sim = sym(lib, "segreg_init_sim");
    *(void **)&api.alloc = sym(lib, "segreg_alloc");
    *(void **)&api.free = sym(lib, "segreg_free");
    *(void **)&api.attach = sym(lib, "segreg_attach");
    *(void **)&api.reg = sym(lib, "segreg_register");
    *(void **)&api.window_get = sym(lib, "segreg_window_get");
    *(void **)&api.stats = sym(lib, "segreg_stats");
    *(void **)&api.last_error = sym(lib, "segreg_last_error");
    *(void **)&api.comm_create = sym(lib, "segreg_sim_comm_create");
}

/* A wrong answer from an exit handler: exit() must not be called again. */
static void wrong(const char *what) {
    const char *e = api.last_error();
    fprintf(stderr, "exit_calls: %s (last error: %s)\n", what, e ? e : "null");
    _exit(3);
}

/* On a thread whose thread-locals are gone. */
static void calls_after_locals_are_gone(void) {
    void *win = NULL;
    size_t offset = 1;
    if (api.window_get(comm, (char *)segment + 4096, 8, &win, &offset) != SEGREG_OK || !win ||
        offset != 4096)
        wrong("segreg_window_get did not find the segment");
    api.free(segment, 2 * MIB, 0, NULL);
    if (api.window_get(comm, segment, 8, &win, &offset) != SEGREG_ERR_NOT_TRACKED)
        wrong("segreg_window_get found the freed segment");
    if (!api.last_error()) wrong("segreg_last_error said the failed lookup succeeded");
    api.free(segment, 2 * MIB, 0, NULL); /* refused: a double free */
    void *again = api.alloc(2 * MIB, 0, NULL);
    if (!again) wrong("segreg_alloc failed");
    api.free(again, 2 * MIB, 0, NULL);
    segreg_stats_t s;
    if (api.stats(&s, sizeof s) != 0) wrong("segreg_stats failed");
    if (s.frees != 2 || s.bad_frees != 1 || s.mem_frees != 2 || s.live_segments != 0 ||
        s.windows_deregistered != 1)
        wrong("the figures are not those of two frees and a refused one");
    checked = 1;
    fprintf(stderr, "exit_calls: every call answered\n");
}

/* Allocates and registers the segment: touches the thread's locals. */
static void allocate_and_register(void) {
    segment = api.alloc(2 * MIB, 0, NULL);
    if (!segment || api.reg(comm) != 1) {
        fprintf(stderr, "exit_calls: setup failed: %s\n", api.last_error());
        exit(2);
    }
}

static void at_exit(void) {
    calls_after_locals_are_gone();
}

static pthread_key_t key;

static void key_destructor(void *value) {
    (void)value;
    calls_after_locals_are_gone();
}

static void *thread_main(void *arg) {
    (void)arg;
    allocate_and_register();
    pthread_setspecific(key, segment); /* a non-null value: the destructor runs */
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: exit_calls LIB atexit|key-destructor\n");
        return 2;
    }
    load(argv[1]);
    if (api.init_sim() != 0) return 2;
    comm = api.comm_create();
    if (!comm || api.attach(comm) <= 0) return 2;
    if (strcmp(argv[2], "atexit") == 0) {
        allocate_and_register();
        atexit(at_exit);
        return 0; /* exit: the main thread's locals go, then at_exit runs */
    }
    if (strcmp(argv[2], "key-destructor") == 0) {
        pthread_t t;
        if (pthread_key_create(&key, key_destructor) != 0) return 2;
        if (pthread_create(&t, NULL, thread_main, NULL) != 0) return 2;
        pthread_join(t, NULL);
        return checked ? 0 : 3;
    }
    fprintf(stderr, "exit_calls: unknown mode %s\n", argv[2]);
    return 2;
}
