/*
 * The SGLang-shaped baseline of python/gpu/bench_register.py: the simplest
 * registry a C allocator plug would keep. Every segment goes into one
 * vector under a pthread mutex; each comm keeps an index of how many of
 * the vector's segments it registered. A registration pass locks, compares
 * that index with the vector's size, registers what lies past it (through
 * the callback, one segment at a time) and unlocks.
 *
 * It knows no free (a freed segment would have to be found and removed
 * under the same lock, shifting every comm's index), no agreement between
 * ranks and no deadline: it is the cost floor of "register what is new".
 *
 * Built at run time by the benchmark:
 *     gcc -O2 -shared -fPIC -o libsglang_baseline.so sglang_baseline.c -lpthread
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    void *ptr;
    size_t size;
} sgl_segment;

typedef struct {
    void *comm;
    size_t registered; /* segments [0, registered) are registered with comm */
} sgl_comm;

/* What a pass calls for each new segment (ncclCommWindowRegister's place). */
typedef int (*sgl_register_fn)(void *comm, void *ptr, size_t size);

#define SGL_MAX_COMMS 64

static pthread_mutex_t sgl_lock = PTHREAD_MUTEX_INITIALIZER;
static sgl_segment *sgl_segments;
static size_t sgl_len, sgl_cap;
static sgl_comm sgl_comms[SGL_MAX_COMMS];
static int sgl_ncomms;
static sgl_register_fn sgl_fn;

/* Sets the registration callback (NULL: count only). */
void sgl_set_register_fn(sgl_register_fn fn) {
    pthread_mutex_lock(&sgl_lock);
    sgl_fn = fn;
    pthread_mutex_unlock(&sgl_lock);
}

/* Tracks a new segment (the allocator plug's alloc). 0, or -1 out of memory. */
int sgl_track(void *ptr, size_t size) {
    int rc = 0;
    pthread_mutex_lock(&sgl_lock);
    if (sgl_len == sgl_cap) {
        size_t cap = sgl_cap ? 2 * sgl_cap : 64;
        sgl_segment *grown = realloc(sgl_segments, cap * sizeof *grown);
        if (grown == NULL) {
            rc = -1;
            goto out;
        }
        sgl_segments = grown;
        sgl_cap = cap;
    }
    sgl_segments[sgl_len].ptr = ptr;
    sgl_segments[sgl_len].size = size;
    sgl_len++;
out:
    pthread_mutex_unlock(&sgl_lock);
    return rc;
}

/* Attaches a comm: it has registered nothing. 0, or -1 when full. */
int sgl_attach(void *comm) {
    int rc = -1;
    pthread_mutex_lock(&sgl_lock);
    if (sgl_ncomms < SGL_MAX_COMMS) {
        sgl_comms[sgl_ncomms].comm = comm;
        sgl_comms[sgl_ncomms].registered = 0;
        sgl_ncomms++;
        rc = 0;
    }
    pthread_mutex_unlock(&sgl_lock);
    return rc;
}

/* A pass: registers what comm lacks. The number registered, or -1
 * (unknown comm, or the callback failed). */
long sgl_register(void *comm) {
    long n = -1;
    pthread_mutex_lock(&sgl_lock);
    for (int i = 0; i < sgl_ncomms; i++) {
        if (sgl_comms[i].comm != comm) continue;
        n = 0;
        while (sgl_comms[i].registered < sgl_len) {
            sgl_segment *s = &sgl_segments[sgl_comms[i].registered];
            if (sgl_fn != NULL && sgl_fn(comm, s->ptr, s->size) != 0) {
                n = -1;
                break;
            }
            sgl_comms[i].registered++;
            n++;
        }
        break;
    }
    pthread_mutex_unlock(&sgl_lock);
    return n;
}
