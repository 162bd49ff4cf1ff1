/* str.c - small string helpers of the HTTP server: a growable buffer, UTF-8
 * validation, JSON strings from possibly broken UTF-8, and a comparison
 * whose time does not reveal where two secrets differ. */
#include "server_impl.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void sb_add(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void sb_str(sbuf *b, const char *s) {
    sb_add(b, s, strlen(s));
}

void sb_printf(sbuf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof(tmp)) {
        sb_add(b, tmp, (size_t)n);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (!big) {
        b->oom = true;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    sb_add(b, big, (size_t)n);
    free(big);
}

void sb_free(sbuf *b) {
    free(b->p);
    memset(b, 0, sizeof(*b));
}

/* Length of the valid UTF-8 sequence starting at s[0..n), 0 if invalid. */
static size_t utf8_char(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t k;
    unsigned min;
    if ((c & 0xE0) == 0xC0)
        k = 2, min = 0x80;
    else if ((c & 0xF0) == 0xE0)
        k = 3, min = 0x800;
    else if ((c & 0xF8) == 0xF0)
        k = 4, min = 0x10000;
    else
        return 0;
    if (k > n) return 0;
    unsigned cp = c & (0x7Fu >> k);
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return k;
}

size_t utf8_valid_prefix(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t k = utf8_char(u + i, n - i);
        if (!k) break;
        i += k;
    }
    return i;
}

json_t *json_text(const char *s, size_t n) {
    if (utf8_valid_prefix(s, n) == n) return json_stringn(s, n);
    sbuf b = {0};
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_char(u + i, n - i);
        if (k) {
            sb_add(&b, s + i, k);
            i += k;
        } else {
            sb_add(&b, "\xEF\xBF\xBD", 3);
            i++;
        }
    }
    json_t *j = json_stringn(b.p ? b.p : "", b.len);
    sb_free(&b);
    return j;
}

bool const_time_equal(const char *a, size_t na, const char *b, size_t nb) {
    /* every byte of b is looked at whatever a holds, so the time says only
     * how long the expected key is */
    unsigned diff = (unsigned)(na != nb);
    for (size_t i = 0; i < nb; i++) {
        unsigned char x = i < na ? (unsigned char)a[i] : 0;
        diff |= (unsigned)(x ^ (unsigned char)b[i]);
    }
    return diff == 0;
}
