// gguf_builder.h - writes GGUF v3 images byte by byte for tests, so the
// reader is checked against an independent writer (not against itself).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace cptest {

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
