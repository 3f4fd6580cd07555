// FastCDC hot loop. Policy (chunk sizes, what to do with chunks) stays in Python.
#include "chunker.h"

namespace warmstart {
namespace {

struct Gear {
  uint64_t t[256];
  Gear() {
    uint64_t x = 0x7761726d73746172ULL;  // "warmstar"
    for (int i = 0; i < 256; ++i) {
      x += 0x9e3779b97f4a7c15ULL;
      uint64_t z = x;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
      t[i] = z ^ (z >> 31);
    }
  }
};

const Gear kGear;

int log2_floor(size_t v) {
  int b = 0;
  while (v > 1) { v >>= 1; ++b; }
  return b;
}

// The gear hash's high bits depend on the most bytes, so masks take the top bits.
uint64_t top_bits(int k) {
  if (k <= 0) return 0;
  if (k >= 64) return ~0ULL;
  return ~0ULL << (64 - k);
}

}  // namespace

const uint64_t* gear_table() { return kGear.t; }

size_t fastcdc_cuts(const uint8_t* data, size_t n, size_t min, size_t avg, size_t max,
                    bool final, std::vector<uint64_t>& out) {
  const int bits = log2_floor(avg);
  const uint64_t mask_s = top_bits(bits + 2), mask_l = top_bits(bits - 2);
  const uint64_t* g = kGear.t;
  size_t pos = 0;
  while (pos < n) {
    const size_t r = n - pos;
    if (r <= min) {
      if (!final) break;
      out.push_back(r);
      pos += r;
      break;
    }
    const uint8_t* p = data + pos;
    const size_t end = r < max ? r : max;
    const size_t normal = avg < end ? avg : end;
    uint64_t h = 0;
    size_t i = min, cut = 0;
    for (; i < normal; ++i) {
      h = (h << 1) + g[p[i]];
      if ((h & mask_s) == 0) { cut = i + 1; break; }
    }
    if (cut == 0) {
      for (; i < end; ++i) {
        h = (h << 1) + g[p[i]];
        if ((h & mask_l) == 0) { cut = i + 1; break; }
      }
    }
    if (cut == 0) {
      if (end == max) cut = max;
      else if (final) cut = r;
      else break;  // may still find a cut once more bytes arrive
    }
    out.push_back(cut);
    pos += cut;
  }
  return pos;
}

}  // namespace warmstart
