#include "hostio.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "cuda_rt.h"

namespace warmstart {

int64_t pread_full(int fd, uint64_t offset, void* dst, uint64_t length) {
  auto* out = static_cast<char*>(dst);
  uint64_t done = 0;
  while (done < length) {
    ssize_t n = ::pread(fd, out + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -static_cast<int64_t>(errno);
    }
    if (n == 0) break;  // end of file
    done += static_cast<uint64_t>(n);
  }
  return static_cast<int64_t>(done);
}

static void prefault(void* ptr, uint64_t nbytes) {
  const long page = sysconf(_SC_PAGESIZE);
  auto* p = static_cast<volatile char*>(ptr);
  for (uint64_t off = 0; off < nbytes; off += static_cast<uint64_t>(page)) p[off] = 0;
}

void* host_alloc(uint64_t nbytes, bool pinned, int device, int* kind_out, int* cuda_err) {
  if (nbytes == 0) nbytes = 1;
  *cuda_err = 0;
  if (pinned) {
    void* ptr = nullptr;
    *cuda_err = cuda::host_alloc(device, nbytes, &ptr);
    if (*cuda_err != 0) return nullptr;
    *kind_out = kHostCudaPinned;
    return ptr;
  }
  void* ptr = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) return nullptr;
#ifdef MADV_HUGEPAGE
  madvise(ptr, nbytes, MADV_HUGEPAGE);  // advisory: fewer page faults on first touch
#endif
  prefault(ptr, nbytes);
  *kind_out = kHostMmap;
  return ptr;
}

void host_free(void* ptr, uint64_t nbytes, int kind, int device) {
  if (ptr == nullptr) return;
  if (kind == kHostCudaPinned) {
    cuda::host_free(device, ptr);
  } else {
    munmap(ptr, nbytes == 0 ? 1 : nbytes);
  }
}

}  // namespace warmstart

namespace warmstart {

double cached_fraction(int fd, uint64_t size, uint64_t max_pages) {
  if (size == 0) return 1.0;
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  void* map = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) return -static_cast<double>(errno);
  const uint64_t pages = (size + page - 1) / page;
  std::vector<unsigned char> vec(pages);
  double result;
  if (mincore(map, size, vec.data()) != 0) {
    result = -static_cast<double>(errno);
  } else {
    const uint64_t step = max_pages == 0 || pages <= max_pages ? 1 : pages / max_pages;
    uint64_t seen = 0, resident = 0;
    for (uint64_t i = 0; i < pages; i += step) {
      ++seen;
      resident += vec[i] & 1;
    }
    result = static_cast<double>(resident) / static_cast<double>(seen);
  }
  munmap(map, size);
  return result;
}

uint64_t touch_pages(const void* addr, uint64_t length, uint64_t page) {
  if (length == 0 || page == 0) return 0;
  const volatile unsigned char* p = static_cast<const volatile unsigned char*>(addr);
  uint64_t sum = 0;
  for (uint64_t at = 0; at < length; at += page) sum += p[at];
  return sum + p[length - 1];
}

}  // namespace warmstart
