// Host-side I/O and memory: positional reads into caller buffers, reusable host blocks.
#pragma once
#include <cstddef>
#include <cstdint>

namespace warmstart {

// Reads exactly `length` bytes at `offset` unless the file ends first. Returns the number of
// bytes read (short only at end of file) or -errno. Retries EINTR and partial reads.
int64_t pread_full(int fd, uint64_t offset, void* dst, uint64_t length);

// Host memory block kinds, passed back to host_free.
enum HostKind : int { kHostMmap = 1, kHostCudaPinned = 2 };

// Allocates `nbytes` of page-aligned host memory, pre-faulted so later writes run at memory
// speed. `pinned`: through the CUDA runtime (cudaHostAlloc with `device` current), never
// silently anything else: on failure nullptr with the cudaError_t in *cuda_err (-1: runtime
// not loaded); the caller decides the fallback. Else an anonymous mapping with transparent
// huge pages requested; nullptr on failure (errno set).
void* host_alloc(uint64_t nbytes, bool pinned, int device, int* kind_out, int* cuda_err);
void host_free(void* ptr, uint64_t nbytes, int kind, int device);  // device: pinned only

}  // namespace warmstart

namespace warmstart {
// Fraction (0..1) of the file's pages that are in the page cache (mmap + mincore), sampled
// over at most `max_pages` evenly spread pages; -errno on failure.
double cached_fraction(int fd, uint64_t size, uint64_t max_pages);

// Reads one byte of every `page` bytes of [addr, addr + length) (the last byte too): the
// first CPU access to pages that are already resident. Returns the bytes' sum.
uint64_t touch_pages(const void* addr, uint64_t length, uint64_t page);
}  // namespace warmstart
