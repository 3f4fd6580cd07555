// The staged read -> copy -> recycle loop for local files, in native threads.
//
// Reader threads take a job (one chunk of the read plan) and a free ring slot, pread the
// chunk into the slot (the O_DIRECT descriptor when offset, length and slot are aligned),
// check its block sums when the file has them (on the thread that read it), then queue
// cudaMemcpyAsync from the slot on the copy stream and record the slot's event after it.
// One reaper thread waits for those events in stream order; only once a slot's event has
// completed does the slot go back to the free list. Python never sees a chunk: it is told
// which tensors became whole (each tensor knows how many chunks carry its bytes) and which
// jobs failed, in batches, through a blocking `wait` (the binding releases the GIL there).
// Policy stays in Python: what to read, retries after a bad block sum, the error messages.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace warmstart {

struct LoopFile {
  int fd = -1;
  int direct_fd = -1;  // -1: no O_DIRECT descriptor
  uint64_t size = 0;   // bytes in the file when it was opened
  uint64_t block = 0;  // block-sum block size; 0: no sums to check
  std::vector<uint32_t> sums;
};

struct LoopJob {
  uint64_t id = 0;
  uint32_t file = 0;
  uint64_t offset = 0;    // file offset of the read (widened to the source's alignment)
  uint64_t length = 0;    // bytes to read into the slot
  uint64_t skip = 0;      // where the chunk starts inside the slot
  uint64_t copy_len = 0;  // chunk bytes to copy
  uint64_t dst = 0;       // device address of the chunk
  std::vector<uint32_t> tensors;  // tensors this chunk carries bytes of
};

enum LoopStatus : int {
  kLoopReadError = 1,  // code: errno
  kLoopShortRead = 2,  // a: bytes read
  kLoopBadSum = 3,     // a: block index, b: the crc32 seen
  kLoopCudaError = 4,  // code: cudaError_t, a: which call (LoopCall)
};
enum LoopCall : int { kCallMemcpy = 0, kCallRecord = 1, kCallSync = 2 };
// start(): its threads could not all start; the errno is added (no cudaError_t is this large)
constexpr int kLoopThreadsFailed = 1 << 20;

struct LoopFailure {
  uint64_t job = 0;
  int status = 0;
  int64_t code = 0;
  uint64_t a = 0, b = 0;
};

struct LoopBatch {
  std::vector<uint32_t> tensors;  // became whole since the last batch
  std::vector<LoopFailure> failures;
  uint64_t bytes = 0;             // chunk bytes copied since the last batch
  bool cancelled = false;
};

struct LoopStats {
  uint64_t chunks_read = 0, copies = 0, chunks_done = 0, wakeups = 0, bytes = 0;
  uint64_t direct_reads = 0, blocks_checked = 0;
  uint32_t slots = 0, slots_in_use = 0, max_slots_in_use = 0, readers = 0;
};

class CopyLoop {
 public:
  // `ring`: `slots` slots of `slot_bytes` each; `tensor_chunks[t]`: chunks tensor t waits for.
  CopyLoop(int device, uintptr_t stream, char* ring, uint32_t slots, uint64_t slot_bytes,
           uint32_t readers, std::vector<LoopFile> files, std::vector<uint32_t> tensor_chunks);
  ~CopyLoop();
  CopyLoop(const CopyLoop&) = delete;
  CopyLoop& operator=(const CopyLoop&) = delete;

  // Creates the slots' events (on the calling thread, `device` made current) and starts the
  // threads. Returns a cudaError_t, or kLoopThreadsFailed + errno when the threads could not
  // all start; on failure nothing runs and close() is still safe.
  int start();
  // Queues jobs (ignored once cancelled). A job resubmitted after a failure counts again.
  void submit(std::vector<LoopJob> jobs);
  // Blocks until a tensor became whole, a job failed, or the loop was cancelled; returns what
  // happened since the last call. A timeout (seconds, < 0: none) returns what there is.
  LoopBatch wait(double timeout);
  // Stops taking jobs: queued ones are dropped, reads in progress end without a copy, and
  // waiters wake. Copies already queued still run; close() waits for them.
  void cancel();
  // Cancels, joins every thread, waits until no copy reads the ring, destroys the events.
  // Only after it returns may the ring be freed. Safe to call more than once.
  void close();
  LoopStats stats();

 private:
  struct Slot {
    uint32_t index;
    LoopJob job;
  };
  void read_worker();
  void reap_worker();
  // Under mu_: a chunk's copy is done; counts its tensors down.
  void finish(const LoopJob& job);
  void fail(const LoopJob& job, int status, int64_t code, uint64_t a, uint64_t b);
  // Reads and checks a job into slot `index`; false with a failure recorded.
  bool read_into_slot(const LoopJob& job, uint32_t index);

  const int device_;
  const uintptr_t stream_;
  char* const ring_;
  const uint32_t slots_;
  const uint64_t slot_bytes_;
  const uint32_t readers_;
  const std::vector<LoopFile> files_;
  std::vector<uint32_t> left_;  // chunks each tensor still waits for
  std::vector<uintptr_t> events_;

  std::mutex mu_;
  std::condition_variable work_cv_;  // readers: a job and a free slot, or stop
  std::condition_variable reap_cv_;  // reaper: a copy in flight, or readers done
  std::condition_variable out_cv_;   // waiters: something to report
  std::mutex stream_mu_;             // copy + record + in-flight append, in one order
  std::deque<LoopJob> jobs_;
  std::vector<uint32_t> free_;
  std::deque<Slot> in_flight_;  // in stream order
  LoopBatch out_;
  bool stop_ = false;
  bool started_ = false;
  bool closed_ = false;
  uint32_t readers_running_ = 0;
  LoopStats stats_;
  std::vector<std::thread> threads_;
};

}  // namespace warmstart
