// gguf_builder.h - writes GGUF v3 images byte by byte for tests, so the
// reader is checked against an independent writer (not against itself),
// with Q8_0 and Q4_0 blocks from quantizers written here after ggml's
// reference ones (not the runtime's).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace cptest {

// GGUF tensor types the builder can quantize to.
enum : uint32_t { kGgufF32 = 0, kGgufQ4_0 = 2, kGgufQ8_0 = 8 };

// The IEEE half bits of f, rounded to nearest even (the blocks' scales).
inline uint16_t fp16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, fe = (x >> 23) & 0xffu;
    uint32_t mant = x & 0x7fffffu;
    if (fe == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u));
    const int e = (int)fe - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    uint32_t h, rem, half;
    if (e <= 0) { // a half subnormal: mant * 2^-24 units
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        const int shift = 14 - e;
        h = mant >> shift;
        rem = mant & ((1u << shift) - 1);
        half = 1u << (shift - 1);
    } else {
        h = ((uint32_t)e << 10) | (mant >> 13);
        rem = mant & 0x1fffu;
        half = 0x1000u;
    }
    if (rem > half || (rem == half && (h & 1))) h++; // a carry moves into the exponent, as it should
    return (uint16_t)(sign | h);
}

// Row-major values (a multiple of 32 per row) as ggml's block_q8_0:
// {fp16 d = amax / 127; int8 q[32] = round(x / d)}.
inline std::vector<uint8_t> quantize_q8_0(const std::vector<float> &v) {
    std::vector<uint8_t> out;
    for (size_t b = 0; b + 32 <= v.size(); b += 32) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = std::fmax(amax, std::fabs(v[b + j]));
        const float d = amax / 127, id = d != 0 ? 1 / d : 0;
        const uint16_t dh = fp16_bits(d);
        out.push_back((uint8_t)dh);
        out.push_back((uint8_t)(dh >> 8));
        for (int j = 0; j < 32; j++) out.push_back((uint8_t)(int8_t)std::lround(v[b + j] * id));
    }
    return out;
}

// As ggml's block_q4_0: {fp16 d = x_maxabs / -8; u8 qs[16]}, element j in
// the low nibble of qs[j] and element 16 + j in the high one, each
// min(15, x / d + 8.5) truncated.
inline std::vector<uint8_t> quantize_q4_0(const std::vector<float> &v) {
    std::vector<uint8_t> out;
    for (size_t b = 0; b + 32 <= v.size(); b += 32) {
        float amax = 0, max = 0;
        for (int j = 0; j < 32; j++)
            if (std::fabs(v[b + j]) > amax) amax = std::fabs(v[b + j]), max = v[b + j];
        const float d = max / -8, id = d != 0 ? 1 / d : 0;
        const uint16_t dh = fp16_bits(d);
        out.push_back((uint8_t)dh);
        out.push_back((uint8_t)(dh >> 8));
        for (int j = 0; j < 16; j++) {
            const int lo = std::min(15, (int)(int8_t)(v[b + j] * id + 8.5f));
            const int hi = std::min(15, (int)(int8_t)(v[b + 16 + j] * id + 8.5f));
            out.push_back((uint8_t)(lo | hi << 4));
        }
    }
    return out;
}

class GgufBuilder {
  public:
    explicit GgufBuilder(uint32_t version = 3, uint32_t alignment = 32) : version_(version), align_(alignment) {}

    void kv_u32(const std::string &k, uint32_t v) { key(k, 4); put(v); n_kv_++; }
    void kv_i32(const std::string &k, int32_t v) { key(k, 5); put(v); n_kv_++; }
    void kv_f32(const std::string &k, float v) { key(k, 6); put(v); n_kv_++; }
    void kv_bool(const std::string &k, bool v) { key(k, 7); put((uint8_t)v); n_kv_++; }
    void kv_u64(const std::string &k, uint64_t v) { key(k, 10); put(v); n_kv_++; }
    void kv_f64(const std::string &k, double v) { key(k, 12); put(v); n_kv_++; }
    void kv_str(const std::string &k, const std::string &v) { key(k, 8); str(kv_, v); n_kv_++; }
    void kv_arr_str(const std::string &k, const std::vector<std::string> &v) {
        key(k, 9);
        put((uint32_t)8);
        put((uint64_t)v.size());
        for (auto &s : v) str(kv_, s);
        n_kv_++;
    }
    void kv_arr_i32(const std::string &k, const std::vector<int32_t> &v) {
        key(k, 9);
        put((uint32_t)5);
        put((uint64_t)v.size());
        for (auto x : v) put(x);
        n_kv_++;
    }
    void kv_arr_f32(const std::string &k, const std::vector<float> &v) {
        key(k, 9);
        put((uint32_t)6);
        put((uint64_t)v.size());
        for (auto x : v) put(x);
        n_kv_++;
    }
    // Raw bytes appended to the metadata section (for malformed entries).
    void kv_raw(const std::vector<uint8_t> &bytes, int count) {
        kv_.insert(kv_.end(), bytes.begin(), bytes.end());
        n_kv_ += count;
    }

    // A tensor with ne (innermost first) of GGUF type `type` and its raw bytes.
    void tensor(const std::string &name, uint32_t type, std::vector<uint64_t> ne, const void *data,
                size_t nbytes) {
        Tensor t{name, type, ne, std::vector<uint8_t>((const uint8_t *)data, (const uint8_t *)data + nbytes)};
        tensors_.push_back(t);
    }
    void tensor_f32(const std::string &name, std::vector<uint64_t> ne, const std::vector<float> &v) {
        tensor(name, 0, ne, v.data(), v.size() * sizeof(float));
    }
    // The values in GGUF type `type` (kGgufF32, kGgufQ8_0 or kGgufQ4_0;
    // ne[0] a multiple of 32 for the block types).
    void tensor_as(const std::string &name, uint32_t type, std::vector<uint64_t> ne, const std::vector<float> &v) {
        if (type == kGgufF32) return tensor_f32(name, ne, v);
        const std::vector<uint8_t> q = type == kGgufQ8_0 ? quantize_q8_0(v) : quantize_q4_0(v);
        tensor(name, type, ne, q.data(), q.size());
    }

    // Overrides the offset written for tensor i (to build corrupt files).
    void override_offset(size_t i, uint64_t off) { overrides_.push_back({i, off}); }

    std::vector<uint8_t> build() const {
        std::vector<uint8_t> out;
        auto put_out = [&](const void *p, size_t n) {
            out.insert(out.end(), (const uint8_t *)p, (const uint8_t *)p + n);
        };
        uint32_t magic = 0x46554747u;
        put_out(&magic, 4);
        put_out(&version_, 4);
        uint64_t nt = tensors_.size(), nk = n_kv_;
        put_out(&nt, 8);
        put_out(&nk, 8);
        out.insert(out.end(), kv_.begin(), kv_.end());
        uint64_t off = 0;
        std::vector<uint64_t> offs;
        for (size_t i = 0; i < tensors_.size(); i++) {
            const Tensor &t = tensors_[i];
            std::vector<uint8_t> tmp;
            str(tmp, t.name);
            out.insert(out.end(), tmp.begin(), tmp.end());
            uint32_t nd = (uint32_t)t.ne.size();
            put_out(&nd, 4);
            for (auto d : t.ne) put_out(&d, 8);
            put_out(&t.type, 4);
            uint64_t o = off;
            for (auto &ov : overrides_)
                if (ov.first == i) o = ov.second;
            put_out(&o, 8);
            offs.push_back(off);
            off += (t.data.size() + align_ - 1) / align_ * align_;
        }
        while (out.size() % align_) out.push_back(0);
        for (size_t i = 0; i < tensors_.size(); i++) {
            const Tensor &t = tensors_[i];
            out.insert(out.end(), t.data.begin(), t.data.end());
            // no padding after the last tensor: every byte of the file matters
            if (i + 1 < tensors_.size())
                while (out.size() % align_) out.push_back(0);
        }
        return out;
    }

  private:
    struct Tensor {
        std::string name;
        uint32_t type;
        std::vector<uint64_t> ne;
        std::vector<uint8_t> data;
    };
    template <typename T> void put(T v) {
        const uint8_t *p = (const uint8_t *)&v;
        kv_.insert(kv_.end(), p, p + sizeof(T));
    }
    static void str(std::vector<uint8_t> &dst, const std::string &s) {
        uint64_t n = s.size();
        const uint8_t *p = (const uint8_t *)&n;
        dst.insert(dst.end(), p, p + 8);
        dst.insert(dst.end(), s.begin(), s.end());
    }
    void key(const std::string &k, uint32_t type) {
        str(kv_, k);
        put(type);
    }
    uint32_t version_, align_;
    uint64_t n_kv_ = 0;
    std::vector<uint8_t> kv_;
    std::vector<Tensor> tensors_;
    std::vector<std::pair<size_t, uint64_t>> overrides_;
};

}  // namespace cptest
