// CRC-32 (the zlib / IEEE 802.3 polynomial, as Python's zlib.crc32): the block sums of
// verify=True, checked by the native copy loop on the thread that read the block.
#pragma once
#include <cstddef>
#include <cstdint>

namespace warmstart {
uint32_t crc32(const void* data, size_t n, uint32_t crc = 0);
}  // namespace warmstart
