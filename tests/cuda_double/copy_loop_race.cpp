// The native copy loop (csrc/copy_loop.cpp) driven from C++ against the CUDA runtime double,
// built with ThreadSanitizer by tests/loader/test_native_loop.py: data races between its
// readers, its reaper, the waiter and cancel/close show up as TSAN reports (a failed run).
//
//   copy_loop_race DOUBLE.so FILE ROUNDS
//
// Each round loads FILE (a multiple of 64 KiB) through a 6-slot ring with 4 readers into a
// destination buffer; even rounds run to the end and compare the bytes, odd rounds cancel
// after the first batch. Prints "ok <rounds>" and exits 0 when every check held.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "copy_loop.h"
#include "cuda_rt.h"

using warmstart::CopyLoop;
using warmstart::LoopBatch;
using warmstart::LoopFile;
using warmstart::LoopJob;

namespace {

constexpr uint64_t kChunk = 64 << 10;
constexpr uint32_t kSlots = 6;

int fail(const char* what) {
  std::fprintf(stderr, "copy_loop_race: %s\n", what);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) return fail("usage: copy_loop_race DOUBLE.so FILE ROUNDS");
  if (warmstart::cuda::load({}, {argv[1]}) < 2) return fail("the double did not load");
  const int fd = open(argv[2], O_RDONLY);
  if (fd < 0) return fail("cannot open the file");
  const uint64_t size = static_cast<uint64_t>(lseek(fd, 0, SEEK_END));
  std::vector<char> want(size);
  if (pread(fd, want.data(), size, 0) != static_cast<ssize_t>(size)) return fail("short read");
  const uint64_t chunks = size / kChunk;
  const int rounds = std::atoi(argv[3]);

  uintptr_t stream = 0;
  if (warmstart::cuda::stream_create(1, &stream) != 0) return fail("stream");
  void* ring = nullptr;
  if (warmstart::cuda::host_alloc(1, kSlots * kChunk, &ring) != 0) return fail("pinned ring");
  std::vector<char> dst(size);

  for (int round = 0; round < rounds; ++round) {
    std::memset(dst.data(), 0, size);
    std::vector<LoopFile> files(1);
    files[0].fd = fd;
    files[0].size = size;
    // one tensor per 4 chunks
    std::vector<uint32_t> tensor_chunks((chunks + 3) / 4, 0);
    std::vector<LoopJob> jobs;
    for (uint64_t c = 0; c < chunks; ++c) {
      LoopJob j;
      j.id = c, j.offset = c * kChunk, j.length = kChunk, j.copy_len = kChunk;
      j.dst = reinterpret_cast<uint64_t>(dst.data() + c * kChunk);
      j.tensors = {static_cast<uint32_t>(c / 4)};
      tensor_chunks[c / 4]++;
      jobs.push_back(j);
    }
    const size_t tensors = tensor_chunks.size();
    CopyLoop loop(1, stream, static_cast<char*>(ring), kSlots, kChunk, 4, std::move(files),
                  std::move(tensor_chunks));
    if (loop.start() != 0) return fail("start");
    loop.submit(std::move(jobs));
    size_t whole = 0;
    const bool cancel = round % 2 == 1;
    while (whole < tensors) {
      LoopBatch b = loop.wait(30.0);
      if (!b.failures.empty()) return fail("a job failed");
      whole += b.tensors.size();
      if (cancel && whole > 0) {
        loop.cancel();
        break;
      }
      if (b.tensors.empty() && !b.cancelled) return fail("waited 30 s for nothing");
    }
    loop.close();
    warmstart::LoopStats s = loop.stats();
    if (s.slots_in_use != 0) return fail("a slot still in use after close");
    if (!cancel && std::memcmp(dst.data(), want.data(), size) != 0) return fail("bytes differ");
  }
  warmstart::cuda::host_free(1, ring);
  warmstart::cuda::stream_destroy(1, stream);
  close(fd);
  std::printf("ok %d\n", rounds);
  return 0;
}
