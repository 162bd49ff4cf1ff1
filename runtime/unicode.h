/* unicode.h - strict UTF-8 decoding/encoding and the Unicode general-category
 * classes (L, N, P, S, M, Z, C) plus the White_Space property that the
 * tokenizers' pre-tokenizer matchers need. The tables live in the generated
 * unicode_data.c (runtime/gen_unicode_data.py). */
#ifndef CP_UNICODE_H
#define CP_UNICODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Category class bits (exactly one for an assigned code point, none for an
 * unassigned one) and the White_Space bit. */
enum {
    CP_UCAT_L = 0x01,      /* letters: Lu Ll Lt Lm Lo */
    CP_UCAT_N = 0x02,      /* numbers: Nd Nl No */
    CP_UCAT_P = 0x04,      /* punctuation */
    CP_UCAT_S = 0x08,      /* symbols */
    CP_UCAT_M = 0x10,      /* marks */
    CP_UCAT_Z = 0x20,      /* separators */
    CP_UCAT_C = 0x40,      /* Cc Cf Co (Cn and Cs are left at 0) */
    CP_UFLAG_SPACE = 0x80, /* White_Space property (what regex \s matches) */
};

typedef struct cp_unicode_range {
    uint32_t first, last; /* inclusive */
    uint8_t flags;
} cp_unicode_range;

/* Generated tables (unicode_data.c). */
extern const cp_unicode_range cp_unicode_ranges[];
extern const size_t cp_unicode_n_ranges;
extern const char cp_unicode_version[];
extern const uint8_t cp_unicode_ascii[128]; /* flags of U+0000..U+007F */

/* Flags of code point cp (0 for unassigned or out of range). O(1) for ASCII,
 * a binary search otherwise. */
uint8_t cp_unicode_flags(uint32_t cp);

/* Decodes one strict UTF-8 sequence (no overlongs, no surrogates, nothing
 * above U+10FFFF) from s[0..n). Returns its length 1..4 and stores the code
 * point, or returns 0 when the bytes are not valid UTF-8 (or n == 0). */
size_t cp_utf8_decode(const uint8_t *s, size_t n, uint32_t *cp);

/* Checks that s[0..n) is valid UTF-8. Returns true, or false with *bad_at
 * set to the offset of the first byte of the first invalid sequence. */
bool cp_utf8_valid(const char *s, size_t n, size_t *bad_at);

/* Encodes cp (<= U+10FFFF) into out; returns the number of bytes (1..4). */
size_t cp_utf8_encode(uint32_t cp, char out[4]);

/* Length of the UTF-8 sequence that starts with lead byte b (1 for a
 * continuation or invalid byte, so that callers always make progress). */
size_t cp_utf8_len(uint8_t b);

#ifdef __cplusplus
}
#endif

#endif /* CP_UNICODE_H */
