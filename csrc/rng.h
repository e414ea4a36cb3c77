// Counter-based hashing: a bit-exact port of soundstorm/kernels/rng.py.
//
// Every random value is a pure function of (seed, level, iteration, stream, frame[, code]),
// mixed with Chris Wellons' lowbias32 hash in uint32 arithmetic (Python holds the same
// values in int64 and masks every product to 32 bits; the low 32 bits agree).
//
// The uint32 -> Gumbel step, -log(-log(u)) with u = ((h >> 9) + 0.5) * 2**-23, depends only
// on the top 23 bits of the hash. The float32 logarithm of libm and that of PyTorch's
// vectorised kernels differ in the last bit for about 1% of inputs, so instead of calling
// logf here the caller passes a table of the 2**23 Gumbel values computed by rng.to_gumbel
// itself: the noise is then equal bit for bit to the reference's on every machine.
#pragma once

#include <cstdint>

namespace soundstorm {
namespace rng {

constexpr uint32_t GOLDEN32 = 0x9E3779B9u;
constexpr uint32_t STREAM_CANDIDATE = 1;
constexpr uint32_t STREAM_CONFIDENCE = 2;

// lowbias32: a bijective avalanche hash.
inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

// One key per row for a (level, iteration, stream) triple (rng.step_keys).
inline uint32_t step_key(int64_t seed, int64_t level, int64_t iteration, uint32_t stream) {
    const uint64_t s = uint64_t(seed);
    const uint32_t lo = uint32_t(s & 0xFFFFFFFFu);
    const uint32_t hi = uint32_t(s >> 32);
    const uint32_t tag = (uint32_t(uint64_t(level) & 0xFFFF) << 16) |
                         (uint32_t(uint64_t(iteration) & 0xFFF) << 4) | (stream & 0xF);
    return mix32(lo ^ mix32(hi ^ mix32(tag)));
}

// Per-frame key (rng.frame_keys): t is the absolute frame index.
inline uint32_t frame_key(uint32_t key, int64_t t) {
    return mix32(key ^ (uint32_t(uint64_t(t)) * GOLDEN32));
}

}  // namespace rng
}  // namespace soundstorm
