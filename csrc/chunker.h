// Content-defined chunking (FastCDC with a gear rolling hash) for the image format.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace warmstart {

// Appends the lengths of consecutive chunks of data[0, n) to `out`. Cuts follow FastCDC:
// no cut before `min`, a stricter mask up to `avg`, a looser one up to `max`, a forced cut at
// `max`. With final=false a trailing piece that could still grow is left out (the caller
// keeps it and calls again with more bytes); with final=true it becomes the last chunk.
// Returns the number of bytes covered by the appended chunks.
size_t fastcdc_cuts(const uint8_t* data, size_t n, size_t min, size_t avg, size_t max,
                    bool final, std::vector<uint64_t>& out);

// The 256-entry gear table (splitmix64 from a fixed seed); exposed for reference tests.
const uint64_t* gear_table();

}  // namespace warmstart
