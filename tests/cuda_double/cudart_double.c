/* A CUDA runtime double for warmstart's tests: the entry points csrc/cuda_rt.cpp resolves,
 * backed by host memory, so the staged GPU pipeline runs on machines without a GPU.
 *
 * Faithful where the loader's correctness depends on it:
 *   - every stream has a worker thread that runs its operations later, in stream order
 *     (copies, event records, waits on events); cudaMemcpyAsync returns before the copy;
 *   - copies from pinned memory (cudaHostAlloc/cudaHostRegister) read the source when they
 *     run; copies from pageable memory take a snapshot at the call, as the real runtime does;
 *   - cudaSetDevice creates the device's context (CUDA 12 semantics); a call that needs a
 *     context on a thread that never chose a device creates one on device 0.
 * Bookkeeping the tests read through the cuda_double_* functions: contexts per device, calls
 * per name and device, calls and device changes per thread, copies from pinned or pageable
 * memory, and hazards: a source written while its copy was pending (its checksum at the call
 * differs from the bytes copied) or host memory freed under a pending copy.
 * Knobs: CUDA_DOUBLE_DEVICES (2), CUDA_DOUBLE_COPY_DELAY_US (100: each copy waits this long
 * before it runs, so a premature reuse of its source is seen), and the functions below:
 * pausing copies, failing pinned allocations above a size, failing the n-th cudaMemcpyAsync
 * call (returned at the call) or the n-th copy as it runs (an asynchronous error, returned by
 * the next synchronize or query of that stream's work, as a sticky device error would be).
 * Test code only: never shipped, never loaded unless a test names its path. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef int cudaError_t;
enum {
  kOk = 0, kInvalidValue = 1, kOutOfMemory = 2, kInvalidDevice = 101, kInvalidHandle = 400,
  kNotReady = 600, kIllegalAddress = 700
};
#define MAXDEV 8
#define MAXTHREADS 512
#define MAXBLOCKS 1024

enum OpKind { OP_COPY = 1, OP_RECORD, OP_WAIT, OP_HOLD };

struct Event;
typedef struct Op {
  int kind;
  void* dst;
  const void* src;   /* what the copy reads when it runs (a snapshot for pageable sources) */
  const void* orig;  /* the caller's source, for the freed-under-copy check */
  void* staging;     /* owned snapshot of a pageable source */
  size_t n;
  uint64_t sum;
  struct Event* ev;
  uint64_t gen;
  struct Op* next;
} Op;

typedef struct Stream {
  int device;
  pthread_t worker;
  Op *head, *tail;
  int stop;
  uint64_t holds, releases;
} Stream;

typedef struct Event {
  unsigned flags;
  uint64_t recorded, completed;
  Stream* last_stream;
} Event;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;  /* guards everything below */
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;    /* broadcast on any progress */
static int ndev = -1;
static long delay_us = 100;
static int paused = 0;
static size_t fail_above = 0;
static long fail_call_at = 0, fail_run_at = 0;  /* 1-based: the n-th call / n-th copy run */
static int fail_call_code = 0, fail_run_code = 0;
static long copy_calls, copies_run;
static int async_error = 0;  /* set by a failed copy run; returned by later syncs/queries */
static Stream* legacy[MAXDEV];

static __thread int cur_dev = 0;

static struct { void* ptr; size_t n; } blocks[MAXBLOCKS];
static int contexts[MAXDEV];
static long copies_enqueued, copies_done, copies_pinned, copies_pageable;
static long hazard_written, hazard_freed;
static long events_created, events_blocking, host_alloc_failures;
static size_t pinned_live;
static struct { long tid, calls, changes; } threads_seen[MAXTHREADS];

static const char* kNames[] = {"cudaHostAlloc", "cudaFreeHost", "cudaHostRegister",
                               "cudaHostUnregister", "cudaStreamCreateWithFlags",
                               "cudaStreamDestroy", "cudaStreamSynchronize",
                               "cudaStreamWaitEvent", "cudaMemcpyAsync",
                               "cudaEventCreateWithFlags", "cudaEventRecord", "cudaEventQuery",
                               "cudaEventSynchronize", "cudaEventDestroy", "cudaSetDevice"};
#define NNAMES (sizeof(kNames) / sizeof(kNames[0]))
static long per_call[NNAMES][MAXDEV];
static long waits_for_stream_count;
static Stream* waits_for_stream_target;

static void init(void) {
  if (ndev >= 0) return;
  const char* d = getenv("CUDA_DOUBLE_DEVICES");
  ndev = d ? atoi(d) : 2;
  if (ndev < 0) ndev = 0;
  if (ndev > MAXDEV) ndev = MAXDEV;
  const char* us = getenv("CUDA_DOUBLE_COPY_DELAY_US");
  if (us) delay_us = atol(us);
}

static long* thread_row(long which) {
  long tid = (long)syscall(SYS_gettid);
  for (int i = 0; i < MAXTHREADS; ++i) {
    if (threads_seen[i].tid == tid || threads_seen[i].tid == 0) {
      threads_seen[i].tid = tid;
      return which == 0 ? &threads_seen[i].calls : &threads_seen[i].changes;
    }
  }
  static long overflow;
  return &overflow;
}

/* Under mu: a call that needs a context on this thread's current device. */
static void touch(const char* name) {
  init();
  contexts[cur_dev] = 1;
  ++*thread_row(0);
  for (size_t i = 0; i < NNAMES; ++i)
    if (strcmp(kNames[i], name) == 0) per_call[i][cur_dev]++;
}

static uint64_t checksum(const void* p, size_t n) {
  const unsigned char* b = (const unsigned char*)p;
  uint64_t h = 1469598103934665603ULL;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, b + i, 8);
    h = (h ^ w) * 1099511628211ULL;
  }
  for (; i < n; ++i) h = (h ^ b[i]) * 1099511628211ULL;
  return h;
}

static int pinned_index(const void* p) {
  for (int i = 0; i < MAXBLOCKS; ++i) {
    const char* base = (const char*)blocks[i].ptr;
    if (base && (const char*)p >= base && (const char*)p < base + blocks[i].n) return i;
  }
  return -1;
}

static void* worker(void* arg) {
  Stream* s = (Stream*)arg;
  pthread_mutex_lock(&mu);
  for (;;) {
    while (s->head == NULL && !s->stop) pthread_cond_wait(&cv, &mu);
    if (s->head == NULL) break;
    Op* op = s->head;
    if (op->kind == OP_COPY && fail_run_at != 0 && ++copies_run == fail_run_at) {
      async_error = fail_run_code;  /* the copy never happens; the error surfaces later */
      copies_done++;
    } else if (op->kind == OP_COPY) {
      while (paused) pthread_cond_wait(&cv, &mu);
      pthread_mutex_unlock(&mu);
      if (delay_us > 0) usleep((useconds_t)delay_us);
      memcpy(op->dst, op->src, op->n);
      uint64_t seen = checksum(op->dst, op->n);
      pthread_mutex_lock(&mu);
      if (seen != op->sum) hazard_written++;
      copies_done++;
    } else if (op->kind == OP_RECORD) {
      if (op->gen > op->ev->completed) op->ev->completed = op->gen;
    } else if (op->kind == OP_WAIT) {
      while (op->ev->completed < op->gen) pthread_cond_wait(&cv, &mu);
    } else if (op->kind == OP_HOLD) {
      while (s->releases < op->gen) pthread_cond_wait(&cv, &mu);
    }
    s->head = op->next;
    if (s->head == NULL) s->tail = NULL;
    free(op->staging);
    free(op);
    pthread_cond_broadcast(&cv);
  }
  pthread_mutex_unlock(&mu);
  return NULL;
}

static Stream* new_stream(int device) {
  Stream* s = (Stream*)calloc(1, sizeof(Stream));
  s->device = device;
  pthread_create(&s->worker, NULL, worker, s);
  return s;
}

/* Under mu. The legacy default stream (handle 0) of the current device. */
static Stream* stream_of(void* handle) {
  if (handle != NULL) return (Stream*)handle;
  if (legacy[cur_dev] == NULL) legacy[cur_dev] = new_stream(cur_dev);
  return legacy[cur_dev];
}

static void push(Stream* s, Op* op) {
  op->next = NULL;
  if (s->tail) s->tail->next = op; else s->head = op;
  s->tail = op;
  pthread_cond_broadcast(&cv);
}

/* ---- the runtime entry points -------------------------------------------------------- */

cudaError_t cudaGetDeviceCount(int* count) {
  pthread_mutex_lock(&mu);
  init();
  *count = ndev;
  pthread_mutex_unlock(&mu);
  return kOk;
}

cudaError_t cudaGetDevice(int* device) {
  *device = cur_dev;
  return kOk;
}

cudaError_t cudaSetDevice(int device) {
  pthread_mutex_lock(&mu);
  init();
  cudaError_t err = kOk;
  if (device < 0 || device >= ndev) {
    err = kInvalidDevice;
  } else {
    if (device != cur_dev) ++*thread_row(1);
    cur_dev = device;
    touch("cudaSetDevice");
  }
  pthread_mutex_unlock(&mu);
  return err;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case kOk: return "no error";
    case kInvalidValue: return "invalid argument";
    case kOutOfMemory: return "out of memory";
    case kInvalidDevice: return "invalid device ordinal";
    case kInvalidHandle: return "invalid resource handle";
    case kNotReady: return "device not ready";
    case kIllegalAddress: return "an illegal memory access was encountered";
    default: return "unrecognized error code";
  }
}

static cudaError_t add_block(void* ptr, size_t n) {
  for (int i = 0; i < MAXBLOCKS; ++i) {
    if (blocks[i].ptr == NULL) {
      blocks[i].ptr = ptr;
      blocks[i].n = n;
      pinned_live += n;
      return kOk;
    }
  }
  return kOutOfMemory;
}

static Stream* streams_live[4096];
static int streams_count;

/* Under mu: pending copies that still read [ptr, ptr + n). */
static long pending_readers(const void* ptr, size_t n) {
  long found = 0;
  const char* lo = (const char*)ptr;
  const char* hi = lo + n;
  for (int i = 0; i < streams_count; ++i) {
    Stream* s = streams_live[i];
    if (s == NULL) continue;
    for (Op* op = s->head; op; op = op->next)
      if (op->kind == OP_COPY && (const char*)op->orig < hi &&
          (const char*)op->orig + op->n > lo)
        found++;
  }
  return found;
}

static void track_stream(Stream* s) {
  for (int i = 0; i < streams_count; ++i)
    if (streams_live[i] == NULL) { streams_live[i] = s; return; }
  if (streams_count < 4096) streams_live[streams_count++] = s;
}

static void untrack_stream(Stream* s) {
  for (int i = 0; i < streams_count; ++i)
    if (streams_live[i] == s) streams_live[i] = NULL;
}

cudaError_t cudaHostAlloc(void** ptr, size_t n, unsigned flags) {
  (void)flags;
  pthread_mutex_lock(&mu);
  touch("cudaHostAlloc");
  cudaError_t err = kOk;
  *ptr = NULL;
  if (fail_above != 0 && n > fail_above) {
    host_alloc_failures++;
    err = kOutOfMemory;
  } else if (posix_memalign(ptr, 4096, n ? n : 1) != 0) {
    err = kOutOfMemory;
  } else if ((err = add_block(*ptr, n)) != kOk) {
    free(*ptr);
    *ptr = NULL;
  }
  pthread_mutex_unlock(&mu);
  return err;
}

static cudaError_t drop_block(void* ptr, int owned) {
  int i = pinned_index(ptr);
  if (i < 0 || blocks[i].ptr != ptr) return kInvalidValue;
  if (pending_readers(blocks[i].ptr, blocks[i].n)) hazard_freed++;
  pinned_live -= blocks[i].n;
  blocks[i].ptr = NULL;
  if (owned) free(ptr);
  return kOk;
}

cudaError_t cudaFreeHost(void* ptr) {
  pthread_mutex_lock(&mu);
  touch("cudaFreeHost");
  cudaError_t err = drop_block(ptr, 1);
  pthread_mutex_unlock(&mu);
  return err;
}

cudaError_t cudaHostRegister(void* ptr, size_t n, unsigned flags) {
  (void)flags;
  pthread_mutex_lock(&mu);
  touch("cudaHostRegister");
  cudaError_t err = add_block(ptr, n);
  pthread_mutex_unlock(&mu);
  return err;
}

cudaError_t cudaHostUnregister(void* ptr) {
  pthread_mutex_lock(&mu);
  touch("cudaHostUnregister");
  cudaError_t err = drop_block(ptr, 0);
  pthread_mutex_unlock(&mu);
  return err;
}

cudaError_t cudaStreamCreateWithFlags(void** out, unsigned flags) {
  (void)flags;
  pthread_mutex_lock(&mu);
  touch("cudaStreamCreateWithFlags");
  Stream* s = new_stream(cur_dev);
  track_stream(s);
  *out = s;
  pthread_mutex_unlock(&mu);
  return kOk;
}

cudaError_t cudaStreamDestroy(void* handle) {
  if (handle == NULL) return kInvalidHandle;
  Stream* s = (Stream*)handle;
  pthread_mutex_lock(&mu);
  touch("cudaStreamDestroy");
  s->stop = 1;  /* the worker finishes what is queued, then ends */
  pthread_cond_broadcast(&cv);
  pthread_mutex_unlock(&mu);
  pthread_join(s->worker, NULL);
  pthread_mutex_lock(&mu);
  untrack_stream(s);
  pthread_mutex_unlock(&mu);
  free(s);
  return kOk;
}

cudaError_t cudaStreamSynchronize(void* handle) {
  pthread_mutex_lock(&mu);
  touch("cudaStreamSynchronize");
  Stream* s = stream_of(handle);
  while (s->head != NULL) pthread_cond_wait(&cv, &mu);
  cudaError_t err = async_error;
  pthread_mutex_unlock(&mu);
  return err;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, int kind, void* handle) {
  if (kind != 1) return kInvalidValue;  /* only host to device is used */
  pthread_mutex_lock(&mu);
  touch("cudaMemcpyAsync");
  if (fail_call_at != 0 && ++copy_calls == fail_call_at) {
    pthread_mutex_unlock(&mu);
    return fail_call_code;
  }
  Op* op = (Op*)calloc(1, sizeof(Op));
  op->kind = OP_COPY;
  op->dst = dst;
  op->orig = src;
  op->n = n;
  op->sum = checksum(src, n);
  if (pinned_index(src) >= 0) {
    copies_pinned++;
    op->src = src;
  } else {  /* pageable: the runtime stages it before returning */
    copies_pageable++;
    op->staging = malloc(n ? n : 1);
    memcpy(op->staging, src, n);
    op->src = op->staging;
  }
  copies_enqueued++;
  push(stream_of(handle), op);
  pthread_mutex_unlock(&mu);
  return kOk;
}

cudaError_t cudaEventCreateWithFlags(void** out, unsigned flags) {
  pthread_mutex_lock(&mu);
  touch("cudaEventCreateWithFlags");
  Event* ev = (Event*)calloc(1, sizeof(Event));
  ev->flags = flags;
  events_created++;
  if (flags & 1) events_blocking++;
  *out = ev;
  pthread_mutex_unlock(&mu);
  return kOk;
}

cudaError_t cudaEventRecord(void* event, void* handle) {
  if (event == NULL) return kInvalidHandle;
  pthread_mutex_lock(&mu);
  touch("cudaEventRecord");
  Event* ev = (Event*)event;
  Op* op = (Op*)calloc(1, sizeof(Op));
  op->kind = OP_RECORD;
  op->ev = ev;
  op->gen = ++ev->recorded;
  ev->last_stream = stream_of(handle);
  push(ev->last_stream, op);
  pthread_mutex_unlock(&mu);
  return kOk;
}

cudaError_t cudaStreamWaitEvent(void* handle, void* event, unsigned flags) {
  (void)flags;
  if (event == NULL) return kInvalidHandle;
  pthread_mutex_lock(&mu);
  touch("cudaStreamWaitEvent");
  Event* ev = (Event*)event;
  if (ev->last_stream != NULL && ev->last_stream == waits_for_stream_target)
    waits_for_stream_count++;
  Op* op = (Op*)calloc(1, sizeof(Op));
  op->kind = OP_WAIT;
  op->ev = ev;
  op->gen = ev->recorded;
  push(stream_of(handle), op);
  pthread_mutex_unlock(&mu);
  return kOk;
}

cudaError_t cudaEventQuery(void* event) {
  if (event == NULL) return kInvalidHandle;
  pthread_mutex_lock(&mu);
  touch("cudaEventQuery");
  Event* ev = (Event*)event;
  cudaError_t err = ev->completed >= ev->recorded ? async_error : kNotReady;
  pthread_mutex_unlock(&mu);
  return err;
}

cudaError_t cudaEventSynchronize(void* event) {
  if (event == NULL) return kInvalidHandle;
  pthread_mutex_lock(&mu);
  touch("cudaEventSynchronize");
  Event* ev = (Event*)event;
  uint64_t want = ev->recorded;
  while (ev->completed < want) pthread_cond_wait(&cv, &mu);
  cudaError_t err = async_error;
  pthread_mutex_unlock(&mu);
  return err;
}

cudaError_t cudaEventDestroy(void* event) {
  if (event == NULL) return kInvalidHandle;
  pthread_mutex_lock(&mu);
  touch("cudaEventDestroy");
  pthread_mutex_unlock(&mu);
  free(event);
  return kOk;
}

/* ---- bookkeeping and knobs for the tests -------------------------------------------- */

void cuda_double_reset(void) {
  pthread_mutex_lock(&mu);
  memset(per_call, 0, sizeof(per_call));
  memset(threads_seen, 0, sizeof(threads_seen));
  copies_enqueued = copies_done = copies_pinned = copies_pageable = 0;
  hazard_written = hazard_freed = 0;
  events_created = events_blocking = host_alloc_failures = 0;
  waits_for_stream_count = 0;
  fail_above = 0;
  fail_call_at = fail_run_at = copy_calls = copies_run = 0;
  fail_call_code = fail_run_code = async_error = 0;
  pthread_mutex_unlock(&mu);
}

int cuda_double_context(int device) { return device >= 0 && device < MAXDEV && contexts[device]; }

long cuda_double_calls(const char* name, int device) {
  long n = 0;
  pthread_mutex_lock(&mu);
  for (size_t i = 0; i < NNAMES; ++i)
    if (strcmp(kNames[i], name) == 0 && device >= 0 && device < MAXDEV) n = per_call[i][device];
  pthread_mutex_unlock(&mu);
  return n;
}

/* which: 0 context-needing calls made on thread `tid`, 1 device changes on it */
long cuda_double_thread(long tid, int which) {
  long n = 0;
  pthread_mutex_lock(&mu);
  for (int i = 0; i < MAXTHREADS; ++i)
    if (threads_seen[i].tid == tid) n = which == 0 ? threads_seen[i].calls : threads_seen[i].changes;
  pthread_mutex_unlock(&mu);
  return n;
}

/* which: 0 enqueued, 1 done, 2 from pinned, 3 from pageable, 4 source written while
 * pending, 5 host memory freed while pending, 6 events, 7 events with blocking sync,
 * 8 failed cudaHostAlloc calls, 9 live pinned bytes, 10 waits on the watched stream */
long cuda_double_stat(int which) {
  long v = -1;
  pthread_mutex_lock(&mu);
  switch (which) {
    case 0: v = copies_enqueued; break;
    case 1: v = copies_done; break;
    case 2: v = copies_pinned; break;
    case 3: v = copies_pageable; break;
    case 4: v = hazard_written; break;
    case 5: v = hazard_freed; break;
    case 6: v = events_created; break;
    case 7: v = events_blocking; break;
    case 8: v = host_alloc_failures; break;
    case 9: v = (long)pinned_live; break;
    case 10: v = waits_for_stream_count; break;
  }
  pthread_mutex_unlock(&mu);
  return v;
}

int cuda_double_is_pinned(const void* ptr) {
  pthread_mutex_lock(&mu);
  int i = pinned_index(ptr);
  pthread_mutex_unlock(&mu);
  return i >= 0;
}

void cuda_double_fail_host_alloc_above(size_t n) {
  pthread_mutex_lock(&mu);
  fail_above = n;
  pthread_mutex_unlock(&mu);
}

void cuda_double_pause_copies(int on) {
  pthread_mutex_lock(&mu);
  paused = on;
  pthread_cond_broadcast(&cv);
  pthread_mutex_unlock(&mu);
}

/* Count cudaStreamWaitEvent calls on events last recorded on `handle`. */
void cuda_double_watch_stream(void* handle) {
  pthread_mutex_lock(&mu);
  waits_for_stream_target = stream_of(handle);
  waits_for_stream_count = 0;
  pthread_mutex_unlock(&mu);
}

/* A stand-in for kernels queued on a stream: it stays busy until released. */
void cuda_double_hold(void* handle) {
  pthread_mutex_lock(&mu);
  Stream* s = stream_of(handle);
  Op* op = (Op*)calloc(1, sizeof(Op));
  op->kind = OP_HOLD;
  op->gen = ++s->holds;
  push(s, op);
  pthread_mutex_unlock(&mu);
}

void cuda_double_release(void* handle) {
  pthread_mutex_lock(&mu);
  Stream* s = stream_of(handle);
  s->releases = s->holds;
  pthread_cond_broadcast(&cv);
  pthread_mutex_unlock(&mu);
}

/* The n-th cudaMemcpyAsync call from now returns `code` (nothing is queued); 0: never. */
void cuda_double_fail_copy_call(long n, int code) {
  pthread_mutex_lock(&mu);
  fail_call_at = n;
  fail_call_code = code;
  copy_calls = 0;
  pthread_mutex_unlock(&mu);
}

/* The n-th copy to run from now fails on the device: later synchronizes and event queries
 * return `code` (sticky, until cuda_double_reset). */
void cuda_double_fail_copy_run(long n, int code) {
  pthread_mutex_lock(&mu);
  fail_run_at = n;
  fail_run_code = code;
  copies_run = 0;
  pthread_mutex_unlock(&mu);
}
