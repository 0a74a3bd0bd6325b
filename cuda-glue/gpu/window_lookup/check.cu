// check.cu: the window lookup of libsegment_registry_nccl.so on real NCCL,
// checked from a CUDA kernel through NCCL's device API.
//
// One process, one GPU, a one-rank comm (ncclGetUniqueId + ncclCommInitRank).
// Through our C ABI: segreg_init (real NCCL), segreg_attach, segreg_alloc,
// segreg_register. Then, for tensors carved out of the allocations at
// various offsets: segreg_window_get(comm, tensor, bytes, &win, &offset)
// must give the window and the tensor's offset, and a kernel that computes
// ncclGetLocalPointer(win, offset) must reach the tensor's memory:
//   1. the host writes a pattern at the tensor's own address; the kernel
//      reads it back through the local pointer;
//   2. the kernel writes another pattern through the local pointer; the
//      host reads it at the tensor's address, and the bytes just before and
//      after the tensor are unchanged (the offset is exact);
//   3. local pointers are linear: local(tensor) = local(start) + offset.
// NCCL 2.28 maps windows into its own flat address range, so the local
// pointer is usually an alias of the tensor, not the same address: both are
// printed, and the pass criterion is the data, not the address.
// Every error answer is checked too (crosses the end, unknown pointer,
// unknown comm, null outputs, not registered yet, after free, after detach).
//
// Prints one line per check and "window_lookup: PASS (N checks)" or
// "window_lookup: FAIL (k of N checks failed)". Exit status: 0 pass, 1 a
// check failed, 2 the setup failed. Built and run by run.sh.

#include <cuda_runtime.h>
#include <nccl.h>
#ifdef CHECK_CORE_ONLY
// Fallback when the full device API header does not compile here: the core
// part (windows) is all this check uses.
#include <nccl_device/core.h>
#include <nccl_device/impl/core__funcs.h>
#include <nccl_device/impl/ptr__funcs.h>
#else
#include <nccl_device.h>
#endif

#include "segment_registry.h"

#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <string>
#include <vector>

static int g_checks = 0;
static int g_failures = 0;

static void check(bool ok, const char *what) {
  g_checks += 1;
  if (!ok) g_failures += 1;
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

static std::string fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static std::string fmt(const char *f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

static const char *last_error() {
  const char *e = segreg_last_error();
  return e ? e : "(none)";
}

[[noreturn]] static void setup_failed(const std::string &why) {
  std::printf("SETUP FAILED: %s\n", why.c_str());
  std::printf("window_lookup: FAIL (setup: %s)\n", why.c_str());
  std::fflush(stdout);
  std::exit(2);
}

#define CUDA_OR_DIE(call)                                                      \
  do {                                                                         \
    cudaError_t e_ = (call);                                                   \
    if (e_ != cudaSuccess)                                                     \
      setup_failed(fmt("%s: %s", #call, cudaGetErrorString(e_)));              \
  } while (0)

#define NCCL_OR_DIE(call)                                                      \
  do {                                                                         \
    ncclResult_t r_ = (call);                                                  \
    if (r_ != ncclSuccess)                                                     \
      setup_failed(fmt("%s: %s (%s)", #call, ncclGetErrorString(r_),           \
                       ncclGetLastError(nullptr)));                            \
  } while (0)

// ---------------------------------------------------------------------------
// Kernels: everything goes through ncclGetLocalPointer(win, offset).
// ---------------------------------------------------------------------------

struct Probe {
  unsigned long long local;     // ncclGetLocalPointer(win, offset)
  unsigned long long mismatches; // words that differ from the expected value
};

__host__ __device__ static inline uint32_t pattern(uint32_t tag, size_t i) {
  return tag ^ (uint32_t)(i * 2654435761u);
}

// Reads `words` words through the window and counts those that are not
// pattern(tag, i); records the local pointer.
__global__ void read_through_window(ncclWindow_t win, size_t offset, size_t words,
                                    uint32_t tag, Probe *out) {
  const uint32_t *p = (const uint32_t *)ncclGetLocalPointer(win, offset);
  if (blockIdx.x == 0 && threadIdx.x == 0) out->local = (unsigned long long)p;
  unsigned long long bad = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < words;
       i += (size_t)gridDim.x * blockDim.x) {
    // volatile: read the memory, not a cached value.
    if (((const volatile uint32_t *)p)[i] != pattern(tag, i)) bad += 1;
  }
  if (bad) atomicAdd(&out->mismatches, bad);
}

// Writes pattern(tag, i) to `words` words through the window.
__global__ void write_through_window(ncclWindow_t win, size_t offset, size_t words,
                                     uint32_t tag) {
  uint32_t *p = (uint32_t *)ncclGetLocalPointer(win, offset);
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < words;
       i += (size_t)gridDim.x * blockDim.x)
    p[i] = pattern(tag, i);
}

static unsigned grid_for(size_t words) {
  size_t blocks = (words + 255) / 256;
  if (blocks < 1) blocks = 1;
  if (blocks > 1024) blocks = 1024;
  return (unsigned)blocks;
}

// ---------------------------------------------------------------------------

struct Alloc {
  const char *name;
  char *base;
  size_t len;
};

struct Tensor {
  const Alloc *alloc;
  size_t offset; // from the allocation's start
  size_t bytes;  // a multiple of 4
};

static int window_get(void *comm, const void *ptr, size_t size, void **win,
                      size_t *offset) {
  return segreg_window_get(comm, const_cast<void *>(ptr), size, win, offset);
}

// The local pointer of [base + offset] read by a one-word kernel.
static unsigned long long local_pointer(ncclWindow_t win, size_t offset, Probe *probe) {
  CUDA_OR_DIE(cudaMemset(probe, 0, sizeof(Probe)));
  // Zero words: only the pointer is recorded.
  read_through_window<<<1, 32>>>(win, offset, 0, 0, probe);
  CUDA_OR_DIE(cudaGetLastError());
  CUDA_OR_DIE(cudaDeviceSynchronize());
  Probe h;
  CUDA_OR_DIE(cudaMemcpy(&h, probe, sizeof h, cudaMemcpyDeviceToHost));
  return h.local;
}

// Checks one tensor: lookup, then data both ways through the window.
static void check_tensor(void *comm, const Tensor &t, Probe *probe,
                         unsigned long long local_base, uint32_t tag) {
  char *ptr = t.alloc->base + t.offset;
  const size_t words = t.bytes / 4;
  std::string name = fmt("%s+%#zx (%zu bytes)", t.alloc->name, t.offset, t.bytes);

  void *win = (void *)0x1;
  size_t off = (size_t)-1;
  int rc = window_get(comm, ptr, t.bytes, &win, &off);
  check(rc == SEGREG_OK && win != nullptr && off == t.offset,
        fmt("%s: segreg_window_get -> rc %d, win %p, offset %#zx (want %#zx) %s",
            name.c_str(), rc, win, off, t.offset, rc ? last_error() : "")
            .c_str());
  if (rc != SEGREG_OK) return;
  ncclWindow_t w = (ncclWindow_t)win;

  // 1. Host writes at the tensor's address; the kernel reads via the window.
  std::vector<uint32_t> host(words);
  for (size_t i = 0; i < words; i++) host[i] = pattern(tag, i);
  CUDA_OR_DIE(cudaMemcpy(ptr, host.data(), t.bytes, cudaMemcpyHostToDevice));
  CUDA_OR_DIE(cudaMemset(probe, 0, sizeof(Probe)));
  read_through_window<<<grid_for(words), 256>>>(w, off, words, tag, probe);
  CUDA_OR_DIE(cudaGetLastError());
  CUDA_OR_DIE(cudaDeviceSynchronize());
  Probe got;
  CUDA_OR_DIE(cudaMemcpy(&got, probe, sizeof got, cudaMemcpyDeviceToHost));
  std::printf("     %s: tensor %p, ncclGetLocalPointer %#llx (%s)\n", name.c_str(),
              (void *)ptr, got.local,
              got.local == (unsigned long long)ptr ? "same address" : "alias");
  check(got.mismatches == 0,
        fmt("%s: kernel reads through the window what the host wrote at the "
            "tensor (%llu of %zu words differ)",
            name.c_str(), got.mismatches, words)
            .c_str());
  check(got.local == local_base + t.offset,
        fmt("%s: local pointer = local(start) + offset (%#llx vs %#llx)", name.c_str(),
            got.local, local_base + t.offset)
            .c_str());

  // 2. The kernel writes via the window; the host reads at the tensor, and
  // the bytes around it are unchanged.
  const size_t guard = 256;
  size_t before = t.offset < guard ? t.offset : guard;
  size_t after_room = t.alloc->len - (t.offset + t.bytes);
  size_t after = after_room < guard ? after_room : guard;
  std::vector<char> g0(before + after), g1(before + after);
  if (before)
    CUDA_OR_DIE(cudaMemcpy(g0.data(), ptr - before, before, cudaMemcpyDeviceToHost));
  if (after)
    CUDA_OR_DIE(cudaMemcpy(g0.data() + before, ptr + t.bytes, after,
                           cudaMemcpyDeviceToHost));
  write_through_window<<<grid_for(words), 256>>>(w, off, words, ~tag);
  CUDA_OR_DIE(cudaGetLastError());
  CUDA_OR_DIE(cudaDeviceSynchronize());
  std::vector<uint32_t> back(words);
  CUDA_OR_DIE(cudaMemcpy(back.data(), ptr, t.bytes, cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (size_t i = 0; i < words; i++) bad += back[i] != pattern(~tag, i);
  check(bad == 0, fmt("%s: host reads at the tensor what the kernel wrote through "
                      "the window (%zu of %zu words differ)",
                      name.c_str(), bad, words)
                      .c_str());
  if (before)
    CUDA_OR_DIE(cudaMemcpy(g1.data(), ptr - before, before, cudaMemcpyDeviceToHost));
  if (after)
    CUDA_OR_DIE(cudaMemcpy(g1.data() + before, ptr + t.bytes, after,
                           cudaMemcpyDeviceToHost));
  check(g0 == g1, fmt("%s: the %zu bytes before and %zu after the tensor are "
                      "untouched",
                      name.c_str(), before, after)
                      .c_str());
}

// Expects a lookup error: the code, null outputs, a message.
static void expect_refused(void *comm, const void *ptr, size_t size, int want,
                           const char *what) {
  void *win = (void *)0x1;
  size_t off = 12345;
  int rc = window_get(comm, ptr, size, &win, &off);
  const char *msg = segreg_last_error();
  check(rc == want && win == nullptr && off == 0 && msg != nullptr,
        fmt("%s: rc %d (want %d), win %p, offset %zu: %s", what, rc, want, win, off,
            msg ? msg : "(no message)")
            .c_str());
}

// NCCL files mapped into this process (two would mean two NCCLs).
static std::set<std::string> nccl_files() {
  std::set<std::string> files;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    size_t slash = line.find('/');
    if (slash != std::string::npos && line.find("libnccl") != std::string::npos)
      files.insert(line.substr(slash));
  }
  return files;
}

static segreg_stats_t stats() {
  segreg_stats_t s;
  std::memset(&s, 0, sizeof s);
  if (segreg_stats(&s, sizeof s) != 0) setup_failed(fmt("segreg_stats: %s", last_error()));
  return s;
}

int main() {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  const int dev = 0;
  CUDA_OR_DIE(cudaSetDevice(dev));
  CUDA_OR_DIE(cudaFree(nullptr)); // the primary context, as PyTorch makes it
  cudaDeviceProp prop;
  CUDA_OR_DIE(cudaGetDeviceProperties(&prop, dev));
  int runtime_version = 0;
  ncclGetVersion(&runtime_version);
  std::printf("device %d: %s (sm_%d%d); NCCL headers %d, library %d; NCCL_NVLS_ENABLE=%s\n",
              dev, prop.name, prop.major, prop.minor, NCCL_VERSION_CODE, runtime_version,
              std::getenv("NCCL_NVLS_ENABLE") ? std::getenv("NCCL_NVLS_ENABLE") : "(unset)");
  if (runtime_version / 100 != NCCL_VERSION_CODE / 100)
    std::printf("WARNING: NCCL headers %d and library %d differ in major/minor: the "
                "device-side window layout may differ\n",
                NCCL_VERSION_CODE, runtime_version);

  // A one-rank comm.
  ncclUniqueId id;
  NCCL_OR_DIE(ncclGetUniqueId(&id));
  ncclComm_t comm;
  NCCL_OR_DIE(ncclCommInitRank(&comm, 1, id, 0));

  // Our library on real NCCL.
  if (segreg_init() != 0) setup_failed(fmt("segreg_init: %s", last_error()));
  std::printf("segreg backend: %s\n", segreg_backend());
  std::set<std::string> files = nccl_files();
  for (const std::string &f : files) std::printf("     NCCL mapped: %s\n", f.c_str());
  check(files.size() == 1, fmt("one NCCL library in the process (%zu)", files.size()).c_str());
  if (segreg_attach(comm) <= 0) setup_failed(fmt("segreg_attach: %s", last_error()));

  const size_t MiB = 1 << 20;
  Alloc a{"A", (char *)segreg_alloc(8 * MiB, dev, nullptr), 8 * MiB};
  if (!a.base) setup_failed(fmt("segreg_alloc(8 MiB): %s", last_error()));
  Alloc b{"B", (char *)segreg_alloc(2 * MiB, dev, nullptr), 2 * MiB};
  if (!b.base) setup_failed(fmt("segreg_alloc(2 MiB): %s", last_error()));

  // Tracked, not registered yet.
  expect_refused(comm, a.base + 4096, 64, SEGREG_ERR_NOT_REGISTERED,
                 "before the pass: not registered");
  int n = segreg_register(comm);
  check(n == 2, fmt("segreg_register registers both allocations (%d) %s", n,
                    n < 0 ? last_error() : "")
                    .c_str());
  if (n < 0) setup_failed("the registration pass failed");

  void *win_a = nullptr;
  size_t off0 = 1;
  if (window_get(comm, a.base, 1, &win_a, &off0) != SEGREG_OK)
    setup_failed(fmt("segreg_window_get(A): %s", last_error()));
  cudaPointerAttributes attr;
  cudaError_t ae = cudaPointerGetAttributes(&attr, win_a);
  bool on_device = ae == cudaSuccess && attr.type == cudaMemoryTypeDevice;
  check(on_device, fmt("the window handle %p is device memory (ncclGetLocalPointer "
                       "reads it): %s",
                       win_a,
                       on_device ? "yes"
                                 : "no: the comm has no symmetric support (NCCL_WIN_ENABLE=0? "
                                   "cuMem off?)")
                       .c_str());
  if (!on_device) setup_failed("no symmetric windows: the device checks cannot run");

  Probe *probe = nullptr;
  CUDA_OR_DIE(cudaMalloc(&probe, sizeof(Probe)));
  unsigned long long local_a = local_pointer((ncclWindow_t)win_a, 0, probe);
  void *win_b = nullptr;
  if (window_get(comm, b.base, 1, &win_b, &off0) != SEGREG_OK)
    setup_failed(fmt("segreg_window_get(B): %s", last_error()));
  check(win_b != win_a, "one window per allocation");
  unsigned long long local_b = local_pointer((ncclWindow_t)win_b, 0, probe);
  std::printf("     A: %p, window %p, local %#llx; B: %p, window %p, local %#llx\n",
              (void *)a.base, win_a, local_a, (void *)b.base, win_b, local_b);

  // Tensors carved out of the allocations.
  const Tensor tensors[] = {
      {&a, 0, 8 * MiB},               // the whole allocation
      {&a, 0, 4096},                  // at its start
      {&a, 4096, 1 * MiB},            // page-aligned
      {&a, 1 * MiB + 256, 3000},      // not page-aligned, odd size
      {&a, 5 * MiB + 12, 65536},      // 4-byte aligned only
      {&a, 8 * MiB - 1024, 1024},     // up to its end
      {&b, 0, 2 * MiB},               // the other allocation, whole
      {&b, 64 * 1024 + 4, 4000},      // and a piece
  };
  uint32_t tag = 0x5e9a0001;
  for (const Tensor &t : tensors) {
    unsigned long long base = t.alloc == &a ? local_a : local_b;
    check_tensor(comm, t, probe, base, tag++);
  }

  // Error answers.
  expect_refused(comm, a.base + 8 * MiB - 16, 64, SEGREG_ERR_CROSSES_END,
                 "a range past the end: crosses the end");
  void *plain = nullptr;
  CUDA_OR_DIE(cudaMalloc(&plain, 1 * MiB));
  expect_refused(comm, plain, 64, SEGREG_ERR_NOT_TRACKED,
                 "cudaMalloc memory: not tracked");
  expect_refused(comm, nullptr, 64, SEGREG_ERR_NOT_TRACKED, "a null pointer: not tracked");
  expect_refused((void *)0x10, a.base, 64, SEGREG_ERR_NOT_ATTACHED,
                 "an unknown comm: not attached");
  expect_refused(nullptr, a.base, 64, SEGREG_ERR_INVALID, "a null comm: invalid");
  {
    size_t off = 7;
    int rc = segreg_window_get(comm, a.base, 64, nullptr, &off);
    check(rc == SEGREG_ERR_INVALID && off == 0,
          fmt("a null win pointer: rc %d, offset %zu", rc, off).c_str());
    void *w = (void *)0x1;
    rc = segreg_window_get(comm, a.base, 64, &w, nullptr);
    check(rc == SEGREG_ERR_INVALID && w == nullptr,
          fmt("a null offset pointer: rc %d, win %p", rc, w).c_str());
  }

  // A new allocation after the pass: not registered until the next pass.
  Alloc c{"C", (char *)segreg_alloc(4 * MiB, dev, nullptr), 4 * MiB};
  if (!c.base) setup_failed(fmt("segreg_alloc(4 MiB): %s", last_error()));
  expect_refused(comm, c.base + 2 * MiB, 4096, SEGREG_ERR_NOT_REGISTERED,
                 "a new allocation: not registered");
  n = segreg_register(comm);
  check(n == 1, fmt("the next pass registers it (%d)", n).c_str());
  void *win_c = nullptr;
  if (window_get(comm, c.base, 1, &win_c, &off0) != SEGREG_OK)
    setup_failed(fmt("segreg_window_get(C): %s", last_error()));
  unsigned long long local_c = local_pointer((ncclWindow_t)win_c, 0, probe);
  check_tensor(comm, Tensor{&c, 2 * MiB + 512, 65536}, probe, local_c, tag++);

  // Lookup cost (host side, one thread).
  {
    const int iters = 1000000;
    void *w;
    size_t off;
    int bad = 0;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; i++)
      bad += window_get(comm, a.base + (size_t)(i & 1023) * 4096, 4096, &w, &off) != 0;
    auto t1 = std::chrono::steady_clock::now();
    double ns = std::chrono::duration<double, std::nano>(t1 - t0).count() / iters;
    std::printf("     segreg_window_get: %.1f ns per lookup (%d lookups)\n", ns, iters);
    check(bad == 0, fmt("%d timed lookups all found (%d failed)", iters, bad).c_str());
  }

  // After free: the lookups fail cleanly (no window handed out for freed
  // memory), for every tensor of the allocation.
  segreg_stats_t s0 = stats();
  segreg_free(a.base, a.len, dev, nullptr);
  check(segreg_last_error() == nullptr, fmt("segreg_free(A): %s", last_error()).c_str());
  segreg_stats_t s1 = stats();
  check(s1.windows_deregistered == s0.windows_deregistered + 1 &&
            s1.mem_frees == s0.mem_frees + 1,
        fmt("free deregistered A's window (%llu) and freed the memory (%llu)",
            (unsigned long long)(s1.windows_deregistered - s0.windows_deregistered),
            (unsigned long long)(s1.mem_frees - s0.mem_frees))
            .c_str());
  for (const Tensor &t : tensors)
    if (t.alloc == &a)
      expect_refused(comm, a.base + t.offset, t.bytes, SEGREG_ERR_NOT_TRACKED,
                     fmt("after free, A+%#zx: not tracked", t.offset).c_str());

  // After detach: not attached, though B and C are live.
  int d = segreg_detach(comm);
  check(d == 2, fmt("segreg_detach deregisters B's and C's windows (%d) %s", d,
                    d < 0 ? last_error() : "")
                    .c_str());
  expect_refused(comm, b.base, 64, SEGREG_ERR_NOT_ATTACHED, "after detach: not attached");

  segreg_free(b.base, b.len, dev, nullptr);
  segreg_free(c.base, c.len, dev, nullptr);
  NCCL_OR_DIE(ncclCommDestroy(comm));
  CUDA_OR_DIE(cudaFree(plain));
  CUDA_OR_DIE(cudaFree(probe));

  segreg_stats_t s = stats();
  check(s.live_segments == 0 && s.pending_frees == 0 && s.windows_live == 0 &&
            s.windows_registered == s.windows_deregistered && s.mem_frees == s.allocs &&
            s.mem_free_failures == 0 && s.deregister_failures == 0,
        fmt("everything went back: %llu allocs, %llu frees, %llu windows registered, "
            "%llu deregistered, %llu live segments",
            (unsigned long long)s.allocs, (unsigned long long)s.mem_frees,
            (unsigned long long)s.windows_registered,
            (unsigned long long)s.windows_deregistered,
            (unsigned long long)s.live_segments)
            .c_str());

  if (g_failures == 0) {
    std::printf("window_lookup: PASS (%d checks)\n", g_checks);
    return 0;
  }
  std::printf("window_lookup: FAIL (%d of %d checks failed)\n", g_failures, g_checks);
  return 1;
}
