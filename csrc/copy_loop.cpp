#include "copy_loop.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <system_error>

#include "crc32.h"
#include "cuda_rt.h"
#include "hostio.h"

namespace warmstart {
namespace {

constexpr uint64_t kDirectAlign = 4096;
constexpr int kNotReady = 600;  // cudaErrorNotReady

bool aligned(uint64_t v) { return v % kDirectAlign == 0; }

}  // namespace

CopyLoop::CopyLoop(int device, uintptr_t stream, char* ring, uint32_t slots,
                   uint64_t slot_bytes, uint32_t readers, std::vector<LoopFile> files,
                   std::vector<uint32_t> tensor_chunks)
    : device_(device),
      stream_(stream),
      ring_(ring),
      slots_(slots),
      slot_bytes_(slot_bytes),
      readers_(readers == 0 ? 1 : readers),
      files_(std::move(files)),
      left_(std::move(tensor_chunks)) {
  stats_.slots = slots_;
  stats_.readers = readers_;
}

CopyLoop::~CopyLoop() { close(); }

int CopyLoop::start() {
  events_.assign(slots_, 0);
  for (uint32_t i = 0; i < slots_; ++i) {
    if (int err = cuda::event_create(device_, &events_[i])) {
      events_.resize(i);
      return err;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (uint32_t i = slots_; i > 0; --i) free_.push_back(i - 1);  // slot 0 handed out first
  readers_running_ = readers_;
  started_ = true;
  uint32_t readers_started = 0;
  try {
    for (; readers_started < readers_; ++readers_started)
      threads_.emplace_back(&CopyLoop::read_worker, this);
    threads_.emplace_back(&CopyLoop::reap_worker, this);
  } catch (const std::system_error& e) {
    // Out of threads (a pids limit, RLIMIT_NPROC, no room for stacks): the threads that
    // did start stop at once (they wait for mu_, held here), and close() joins them. The
    // exception must not cross into Python's C API (that would abort the process).
    stop_ = true;
    readers_running_ = readers_started;
    work_cv_.notify_all();
    reap_cv_.notify_all();
    return kLoopThreadsFailed + (e.code().value() > 0 ? e.code().value() : EAGAIN);
  }
  return 0;
}

void CopyLoop::submit(std::vector<LoopJob> jobs) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stop_) return;
  for (LoopJob& job : jobs) jobs_.push_back(std::move(job));
  work_cv_.notify_all();
}

LoopBatch CopyLoop::wait(double timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [this] { return stop_ || !out_.tensors.empty() || !out_.failures.empty(); };
  if (timeout < 0) {
    out_cv_.wait(lock, ready);
  } else {
    out_cv_.wait_for(lock, std::chrono::duration<double>(timeout), ready);
  }
  LoopBatch batch;
  std::swap(batch, out_);
  batch.cancelled = stop_;
  stats_.wakeups++;
  return batch;
}

void CopyLoop::cancel() {
  std::lock_guard<std::mutex> lock(mu_);
  stop_ = true;
  jobs_.clear();
  work_cv_.notify_all();
  reap_cv_.notify_all();
  out_cv_.notify_all();
}

void CopyLoop::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;
  }
  cancel();
  for (std::thread& t : threads_) t.join();  // the reaper ends once nothing is in flight
  threads_.clear();
  if (stream_ != 0) cuda::stream_synchronize(device_, stream_);  // belt and braces
  for (uintptr_t ev : events_) cuda::event_destroy(device_, ev);
  events_.clear();
}

LoopStats CopyLoop::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void CopyLoop::fail(const LoopJob& job, int status, int64_t code, uint64_t a, uint64_t b) {
  out_.failures.push_back(LoopFailure{job.id, status, code, a, b});
  out_cv_.notify_all();
}

void CopyLoop::finish(const LoopJob& job) {
  stats_.chunks_done++;
  stats_.bytes += job.copy_len;
  out_.bytes += job.copy_len;
  bool whole = false;
  for (uint32_t t : job.tensors) {
    if (t < left_.size() && left_[t] > 0 && --left_[t] == 0) {
      out_.tensors.push_back(t);
      whole = true;
    }
  }
  if (whole) out_cv_.notify_all();
}

bool CopyLoop::read_into_slot(const LoopJob& job, uint32_t index) {
  char* slot = ring_ + static_cast<uint64_t>(index) * slot_bytes_;
  if (job.file >= files_.size() || job.length > slot_bytes_ ||
      job.skip + job.copy_len > job.length) {
    std::lock_guard<std::mutex> lock(mu_);
    fail(job, kLoopReadError, EINVAL, 0, 0);
    return false;
  }
  const LoopFile& f = files_[job.file];
  const bool direct = f.direct_fd >= 0 && aligned(job.offset) && aligned(job.length) &&
                      aligned(reinterpret_cast<uintptr_t>(slot));
  int64_t n = pread_full(direct ? f.direct_fd : f.fd, job.offset, slot, job.length);
  const uint64_t want = job.offset >= f.size ? 0 : std::min(job.length, f.size - job.offset);
  uint64_t checked = 0;
  bool bad = false;
  uint64_t bad_block = 0, bad_crc = 0;
  if (n >= 0 && static_cast<uint64_t>(n) >= want && f.block != 0) {
    // Whole blocks inside [offset, offset + want); blocks cut by either end belong to the
    // reads that hold them whole (the plan widens reads to whole blocks).
    const uint64_t end_read = job.offset + want;
    for (uint64_t b = (job.offset + f.block - 1) / f.block; b < f.sums.size(); ++b) {
      const uint64_t start = b * f.block;
      const uint64_t end = std::min(start + f.block, f.size);
      if (end > end_read) break;
      const uint32_t got = crc32(slot + (start - job.offset), end - start);
      ++checked;
      if (got != f.sums[b]) {
        bad = true, bad_block = b, bad_crc = got;
        break;
      }
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.chunks_read++;
  stats_.blocks_checked += checked;
  if (direct) stats_.direct_reads++;
  if (n < 0) {
    fail(job, kLoopReadError, -n, 0, 0);
  } else if (static_cast<uint64_t>(n) < want) {
    fail(job, kLoopShortRead, 0, static_cast<uint64_t>(n), 0);
  } else if (bad) {
    fail(job, kLoopBadSum, 0, bad_block, bad_crc);
  } else {
    return true;
  }
  return false;
}

void CopyLoop::read_worker() {
  for (;;) {
    uint32_t index;
    LoopJob job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [this] { return stop_ || (!jobs_.empty() && !free_.empty()); });
      if (stop_) break;
      index = free_.back();
      free_.pop_back();
      job = std::move(jobs_.front());
      jobs_.pop_front();
      stats_.slots_in_use++;
      if (stats_.slots_in_use > stats_.max_slots_in_use)
        stats_.max_slots_in_use = stats_.slots_in_use;
    }
    bool queued = false;
    if (read_into_slot(job, index)) {
      std::lock_guard<std::mutex> order(stream_mu_);  // stream order == in-flight order
      bool stopping;
      {
        std::lock_guard<std::mutex> lock(mu_);
        stopping = stop_;
      }
      if (!stopping) {
        const char* src = ring_ + static_cast<uint64_t>(index) * slot_bytes_ + job.skip;
        int err = cuda::memcpy_h2d_async(device_, reinterpret_cast<void*>(job.dst), src,
                                         job.copy_len, stream_);
        int call = kCallMemcpy;
        if (err == 0) {
          call = kCallRecord;
          err = cuda::event_record(device_, events_[index], stream_);
        }
        if (err != 0) {
          // A copy queued before the failure may still read the slot: wait for the stream.
          cuda::stream_synchronize(device_, stream_);
          std::lock_guard<std::mutex> lock(mu_);
          fail(job, kLoopCudaError, err, call, 0);
        } else {
          std::lock_guard<std::mutex> lock(mu_);
          stats_.copies++;
          in_flight_.push_back(Slot{index, std::move(job)});
          reap_cv_.notify_one();
          queued = true;
        }
      }
    }
    if (!queued) {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(index);
      stats_.slots_in_use--;
      work_cv_.notify_one();
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (--readers_running_ == 0) reap_cv_.notify_all();
}

void CopyLoop::reap_worker() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    reap_cv_.wait(lock, [this] { return !in_flight_.empty() || readers_running_ == 0; });
    if (in_flight_.empty()) break;  // readers are gone: nothing more can be queued
    const uint32_t index = in_flight_.front().index;
    lock.unlock();
    // Blocking-sync events: this thread sleeps until the copy out of the slot is done.
    int err = cuda::event_synchronize(device_, events_[index]);
    if (err != 0) cuda::stream_synchronize(device_, stream_);  // never recycle under DMA
    lock.lock();
    // Everything behind it that is done already goes into the same batch.
    for (bool first = true; !in_flight_.empty(); first = false) {
      Slot& head = in_flight_.front();
      if (!first) {
        lock.unlock();
        err = cuda::event_query(device_, events_[head.index]);
        if (err != 0 && err != kNotReady) cuda::stream_synchronize(device_, stream_);
        lock.lock();
        if (err == kNotReady) break;
      }
      if (err != 0) {
        fail(head.job, kLoopCudaError, err, kCallSync, 0);
      } else if (!stop_) {
        finish(head.job);
      }
      free_.push_back(head.index);
      stats_.slots_in_use--;
      in_flight_.pop_front();
      work_cv_.notify_one();
    }
  }
}

}  // namespace warmstart
