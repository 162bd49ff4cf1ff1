// test_sched.cc - the serving scheduler on the default model: many requests
// in one continuous batch produce exactly the tokens each produces alone
// (greedy and seeded sampling), chunked prefill beside running decodes, stop
// strings, EOS, logprobs, cancellation, preemption on a tiny KV cache, the
// prefix cache, admission errors and the thread-safe entry points.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include "cp_runtime.h"
#include "cp_sched.h"
}

namespace {

struct EngineDel {
    void operator()(cp_engine *e) const { cp_engine_free(e); }
};
using EnginePtr = std::unique_ptr<cp_engine, EngineDel>;
struct SchedDel {
    void operator()(cp_sched *s) const { cp_sched_free(s); }
};
using SchedPtr = std::unique_ptr<cp_sched, SchedDel>;

std::string model_path() {
    const char *e = getenv("CP_TEST_MODEL");
    return (e && *e) ? e : CP_SOURCE_DIR "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

EnginePtr make_engine(int n_seq, int n_ctx = 512) {
    std::string path = model_path();
    FILE *f = fopen(path.c_str(), "rb");
    if (!f) return nullptr;
    fclose(f);
    cp_engine_opts o = {};
    o.model_path = path.c_str();
    o.n_threads = 2;
    o.n_ctx = n_ctx;
    o.n_seq = n_seq;
    cp_engine_t e = nullptr;
    EXPECT_EQ(cp_engine_init(&o, &e), CP_OK) << cp_last_error();
    return EnginePtr(e);
}

// One engine (512 tokens of context, 8 sequences of KV cache) for the
// suite; every test frees its schedulers, so the cache is empty between
// tests.
cp_engine_t shared_engine() {
    static EnginePtr e = make_engine(8);
    return e.get();
}

#define NEED_ENGINE(e)                                                                             \
    if (!(e)) GTEST_SKIP() << "default model not present (CP_TEST_MODEL)"

std::vector<int32_t> encode(cp_engine_t e, const std::string &text) {
    int32_t *ids = nullptr;
    size_t n = 0;
    EXPECT_EQ(cp_tokenizer_encode(cp_engine_tokenizer(e), text.data(), text.size(), false, true,
                                  &ids, &n),
              CP_OK)
        << cp_last_error();
    std::vector<int32_t> v(ids, ids + n);
    free(ids);
    return v;
}

std::vector<int32_t> chat_prompt(cp_engine_t e, const char *user) {
    cp_chat_msg m = {"user", user};
    char *text = nullptr;
    EXPECT_EQ(
        cp_tokenizer_apply_chat(cp_engine_tokenizer(e), &m, 1, CP_CHAT_GENERATION_PROMPT, &text),
        CP_OK);
    std::vector<int32_t> v = encode(e, text);
    free(text);
    return v;
}

// Distinct short prompts (about 6 to 12 tokens).
std::vector<int32_t> prompt_n(cp_engine_t e, int i) {
    static const char *topics[] = {
        "the sea",       "a red bicycle", "mountains in winter",     "bread",
        "a small robot", "physics",       "my grandmother's garden", "the moon"};
    std::string t = "Story " + std::to_string(i) + " about " + topics[i % 8] + ":";
    return encode(e, t);
}

struct Ref {
    std::vector<int32_t> toks;
    std::string text;
    cp_stop_reason stop = CP_STOP_NONE;
};

bool ref_cb(void *user, int32_t tok, const char *piece, size_t len) {
    Ref *r = static_cast<Ref *>(user);
    r->toks.push_back(tok);
    r->text.append(piece, len);
    return true;
}

Ref alone_run(cp_engine_t e, const std::vector<int32_t> &prompt, int max_tokens,
              cp_sample_params sp, uint64_t seed, bool ignore_eos) {
    cp_gen_params p = {};
    p.sample = sp;
    p.seed = seed;
    p.max_tokens = max_tokens;
    p.ignore_eos = ignore_eos;
    Ref r;
    cp_gen_stats st;
    EXPECT_EQ(cp_engine_generate(e, prompt.data(), (int)prompt.size(), &p, ref_cb, &r, &st), CP_OK)
        << cp_last_error();
    r.stop = st.stop;
    return r;
}

// The prompt generated alone through cp_engine_generate. Greedy runs that
// ignore EOS are cached per prompt: a shorter run is a prefix of a longer
// one, so the tests share them (the model's computation for a position does
// not depend on the context size or on other sequences).
Ref alone(cp_engine_t e, const std::vector<int32_t> &prompt, int max_tokens,
          cp_sample_params sp = {}, uint64_t seed = 0, bool ignore_eos = true) {
    if (sp.temperature > 0 || !ignore_eos)
        return alone_run(e, prompt, max_tokens, sp, seed, ignore_eos);
    static std::map<std::vector<int32_t>, std::pair<Ref, std::vector<std::string>>> cache;
    auto it = cache.find(prompt);
    if (it == cache.end() || (int)it->second.first.toks.size() < max_tokens) {
        Ref r = alone_run(e, prompt, max_tokens, sp, seed, ignore_eos);
        std::vector<std::string> pieces;
        for (int32_t t : r.toks) {
            const char *b;
            size_t n;
            EXPECT_EQ(cp_tokenizer_piece(cp_engine_tokenizer(e), t, false, &b, &n), CP_OK);
            pieces.emplace_back(b, n);
        }
        it = cache.insert_or_assign(prompt, std::make_pair(r, pieces)).first;
    }
    Ref r;
    r.stop = CP_STOP_LENGTH;
    for (int i = 0; i < max_tokens; i++) {
        r.toks.push_back(it->second.first.toks[i]);
        r.text += it->second.second[i];
    }
    return r;
}

// What a client sees of one request.
struct Client {
    int64_t id = 0;
    std::vector<int32_t> toks;
    std::string text;
    std::vector<cp_sched_logprob> lp;
    std::vector<std::vector<cp_sched_logprob>> top;
    std::vector<int64_t> event_steps; // step counter at each event
    cp_finish_reason finish = CP_FINISH_NONE;
    int events = 0, n_prompt = 0, n_generated = 0, n_cached = -1;
    double ttft = 0;
    std::string error;
    bool bad = false; // an event after the final one
};

std::atomic<int64_t> g_step{0};

void client_cb(void *user, const cp_sched_event *ev) {
    Client *c = static_cast<Client *>(user);
    if (c->finish != CP_FINISH_NONE) c->bad = true;
    c->events++;
    c->event_steps.push_back(g_step.load());
    c->text.append(ev->text, ev->len);
    for (int i = 0; i < ev->n_tokens; i++) {
        c->toks.push_back(ev->tokens[i]);
        if (ev->logprobs) c->lp.push_back(ev->logprobs[i]);
    }
    if (ev->top) {
        int n = (int)(ev->n_tokens ? 1 : 0);
        for (int i = 0; i < n; i++)
            c->top.emplace_back(ev->top, ev->top + 5);
    }
    c->finish = ev->finish;
    c->n_prompt = ev->n_prompt;
    c->n_generated = ev->n_generated;
    c->n_cached = ev->n_cached;
    c->ttft = ev->ttft_s;
    if (ev->error) c->error = ev->error;
}

cp_sched_request greedy_req(const std::vector<int32_t> &prompt, int max_tokens) {
    cp_sched_request r = {};
    r.prompt = prompt.data();
    r.n_prompt = (int)prompt.size();
    r.max_tokens = max_tokens;
    r.top_logprobs = -1;
    r.ignore_eos = true;
    return r;
}

int64_t submit(cp_sched_t s, const cp_sched_request &r, Client *c) {
    int64_t id = 0;
    EXPECT_EQ(cp_sched_submit(s, &r, client_cb, c, &id), CP_OK) << cp_last_error();
    c->id = id;
    return id;
}

bool all_done(const std::deque<Client> &cs) {
    for (const Client &c : cs)
        if (c.finish == CP_FINISH_NONE) return false;
    return true;
}

// Steps until every client has finished (bounded).
void run_all(cp_sched_t s, const std::deque<Client> &cs, int max_steps = 5000) {
    for (int i = 0; i < max_steps && !all_done(cs); i++) {
        g_step++;
        bool worked = false;
        ASSERT_EQ(cp_sched_step(s, 0, &worked), CP_OK);
    }
    ASSERT_TRUE(all_done(cs)) << "requests still running after " << max_steps << " steps";
}

SchedPtr make_sched(cp_engine_t e, int max_running, int prefill_chunk = 0, bool no_prefix = false,
                    int max_waiting = 0) {
    cp_sched_opts o = {};
    o.max_running = max_running;
    o.prefill_chunk = prefill_chunk;
    o.no_prefix_cache = no_prefix;
    o.max_waiting = max_waiting;
    cp_sched_t s = nullptr;
    EXPECT_EQ(cp_sched_init(e, &o, &s), CP_OK) << cp_last_error();
    return SchedPtr(s);
}

std::string show(const std::vector<int32_t> &v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); i++)
        s += (i ? "," : "") + std::to_string(v[i]);
    return s + "]";
}

// ---- tests ------------------------------------------------------------------

TEST(Sched, GreedyCrowdMatchesAlone) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    // max_tokens 4..11: requests leave the batch at different steps and
    // waiting ones take their places
    const int N = 32;
    auto mt = [](int i) { return 4 + i % 8; };
    std::vector<std::vector<int32_t>> prompts;
    std::vector<Ref> refs;
    int64_t prompt_total = 0, gen_total = 0;
    for (int i = 0; i < N; i++) {
        prompts.push_back(prompt_n(e, i));
        refs.push_back(alone(e, prompts.back(), mt(i)));
        prompt_total += (int64_t)prompts.back().size();
        gen_total += mt(i);
    }
    SchedPtr s = make_sched(e, 8);
    cp_sched_stats st0;
    cp_sched_get_stats(s.get(), &st0);
    EXPECT_EQ(st0.kv_blocks_free, cp_kv_cache_n_blocks(cp_engine_kv(e)));
    std::deque<Client> cs(N);
    for (int i = 0; i < N; i++)
        submit(s.get(), greedy_req(prompts[i], mt(i)), &cs[i]);
    cp_sched_stats st;
    cp_sched_get_stats(s.get(), &st);
    EXPECT_EQ(st.waiting, N);
    g_step++;
    bool worked = false;
    ASSERT_EQ(cp_sched_step(s.get(), 0, &worked), CP_OK);
    EXPECT_TRUE(worked);
    cp_sched_get_stats(s.get(), &st);
    EXPECT_EQ(st.running, 8);
    EXPECT_EQ(st.waiting, N - 8);
    run_all(s.get(), cs);
    for (int i = 0; i < N; i++) {
        EXPECT_EQ(cs[i].toks, refs[i].toks)
            << "request " << i << ": " << show(cs[i].toks) << " vs " << show(refs[i].toks);
        EXPECT_EQ(cs[i].text, refs[i].text) << "request " << i;
        EXPECT_EQ(cs[i].finish, CP_FINISH_LENGTH);
        EXPECT_EQ(cs[i].n_generated, mt(i));
        EXPECT_EQ(cs[i].n_prompt, (int)prompts[i].size());
        EXPECT_GT(cs[i].ttft, 0);
        EXPECT_FALSE(cs[i].bad);
        EXPECT_TRUE(cs[i].lp.empty()); // top_logprobs -1: none
    }
    cp_sched_get_stats(s.get(), &st);
    EXPECT_EQ(st.running, 0);
    EXPECT_EQ(st.waiting, 0);
    EXPECT_EQ(st.generated_tokens, gen_total);
    EXPECT_EQ(st.prompt_tokens, prompt_total);
    EXPECT_EQ(st.kv_blocks_free, st0.kv_blocks_free);
    EXPECT_EQ(st.kv_blocks_used, 0);
    EXPECT_EQ(st.preemptions, 0);
    // about 8 tokens per step: the batch stays full while requests wait
    EXPECT_LT(st.steps, gen_total / 8 + 16);
    EXPECT_GT(st.last_step_s, 0);
}

// A seeded request alone and among others with their own seeds: the same
// tokens, which are also cp_engine_generate's.
void seeded_case(const cp_sample_params &sp, int crowd_n) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    const int MT = 12;
    std::vector<int32_t> p = prompt_n(e, 3);
    Ref ref = alone(e, p, MT, sp, 1234);
    cp_sched_request q = greedy_req(p, MT);
    q.sample = sp;
    q.seed = 1234;

    SchedPtr s = make_sched(e, 8);
    std::deque<Client> one(1);
    submit(s.get(), q, &one[0]);
    run_all(s.get(), one);
    EXPECT_EQ(one[0].toks, ref.toks) << show(one[0].toks) << " vs " << show(ref.toks);
    EXPECT_EQ(one[0].text, ref.text);

    std::deque<Client> crowd(crowd_n);
    std::vector<std::vector<int32_t>> ps;
    for (int i = 0; i < crowd_n; i++)
        ps.push_back(prompt_n(e, 10 + i));
    const int mine = crowd_n / 2;
    for (int i = 0; i < crowd_n; i++) {
        if (i == mine) {
            submit(s.get(), q, &crowd[i]);
            continue;
        }
        cp_sched_request o = greedy_req(ps[i], MT - 4 + 2 * i);
        o.sample = sp;
        o.seed = 99 + i;
        submit(s.get(), o, &crowd[i]);
    }
    run_all(s.get(), crowd);
    EXPECT_EQ(crowd[mine].toks, one[0].toks)
        << show(crowd[mine].toks) << " vs " << show(one[0].toks);
    EXPECT_EQ(crowd[mine].text, one[0].text);
    // another seed gives another continuation
    std::deque<Client> other(1);
    q.seed = 4321;
    submit(s.get(), q, &other[0]);
    run_all(s.get(), other);
    EXPECT_NE(other[0].toks, one[0].toks);
}

// top-k: sampled from the k best candidates of each row
TEST(Sched, SeededTopKSameAloneAndInCrowd) {
    cp_sample_params sp = {};
    sp.temperature = 0.9f;
    sp.top_k = 40;
    sp.top_p = 0.95f;
    seeded_case(sp, 6);
}

// no top-k: the whole vocabulary
TEST(Sched, SeededTopPMinPSameAloneAndInCrowd) {
    cp_sample_params sp = {};
    sp.temperature = 1.0f;
    sp.top_p = 0.9f;
    sp.min_p = 0.05f;
    seeded_case(sp, 4);
}

TEST(Sched, LongPromptChunkedBesideRunningDecode) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    std::string para;
    for (int i = 0; para.size() < 2000; i++)
        para += "Paragraph " + std::to_string(i) +
                " describes the river, the bridge and the old mill. ";
    std::vector<int32_t> longp = encode(e, para);
    ASSERT_GE(longp.size(), 200u);
    longp.resize(200);
    std::vector<int32_t> shortp = prompt_n(e, 1);
    const int MTA = 12, MTB = 6;
    Ref ra = alone(e, shortp, MTA), rb = alone(e, longp, MTB);

    SchedPtr s = make_sched(e, 4, 32);
    std::deque<Client> cs(2);
    submit(s.get(), greedy_req(shortp, MTA), &cs[0]);
    bool worked;
    while (cs[0].toks.empty()) {
        g_step++;
        ASSERT_EQ(cp_sched_step(s.get(), 0, &worked), CP_OK);
    }
    submit(s.get(), greedy_req(longp, MTB), &cs[1]);
    int64_t first = g_step + 1;
    int prefill_steps = 0;
    while (cs[1].toks.empty()) {
        g_step++;
        size_t before = cs[0].toks.size();
        ASSERT_EQ(cp_sched_step(s.get(), 0, &worked), CP_OK);
        ASSERT_TRUE(worked);
        // the running stream gets a token in every step of the long prefill
        EXPECT_EQ(cs[0].toks.size(), before + 1) << "step " << g_step - first;
        prefill_steps++;
    }
    EXPECT_EQ(prefill_steps, (200 + 31) / 32);
    run_all(s.get(), cs);
    EXPECT_EQ(cs[0].toks, ra.toks);
    EXPECT_EQ(cs[1].toks, rb.toks) << show(cs[1].toks) << " vs " << show(rb.toks);
    // one event per step for the short stream: no step skipped it
    for (size_t i = 1; i < cs[0].event_steps.size(); i++)
        EXPECT_EQ(cs[0].event_steps[i], cs[0].event_steps[i - 1] + 1);
}

TEST(Sched, StopStringsMaxTokensAndEos) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    std::vector<int32_t> p = prompt_n(e, 2);
    const int MT = 24;
    cp_tokenizer_t tok = cp_engine_tokenizer(e);
    Ref ref = alone(e, p, MT);
    std::vector<std::string> pieces;
    for (int32_t t : ref.toks) {
        const char *b;
        size_t n;
        ASSERT_EQ(cp_tokenizer_piece(tok, t, false, &b, &n), CP_OK);
        pieces.emplace_back(b, n);
    }
    // a stop string spanning two tokens: the end of one piece and the start
    // of the next
    int at = -1;
    for (int i = 4; i + 1 < (int)pieces.size(); i++)
        if (pieces[i].size() >= 2 && pieces[i + 1].size() >= 2) {
            at = i;
            break;
        }
    ASSERT_GE(at, 0) << "no two adjacent multi-byte pieces in " << ref.text;
    std::string stop = pieces[at].substr(pieces[at].size() - 2) + pieces[at + 1].substr(0, 2);
    // the first token whose text completes a match, and the text before it
    std::string acc;
    int ends = -1;
    for (int i = 0; i < (int)pieces.size() && ends < 0; i++) {
        acc += pieces[i];
        if (acc.find(stop) != std::string::npos) ends = i;
    }
    ASSERT_GE(ends, 0);
    std::string want = ref.text.substr(0, ref.text.find(stop));

    SchedPtr s = make_sched(e, 4);
    std::deque<Client> cs(4);
    const char *stops[] = {"never appears \x01", stop.c_str()};
    cp_sched_request q = greedy_req(p, MT);
    q.stop = stops;
    q.n_stop = 2;
    submit(s.get(), q, &cs[0]);
    // a stop string that never matches: the full text, finish by length
    const char *nostop[] = {"zzqqxx"};
    cp_sched_request q2 = greedy_req(p, MT);
    q2.stop = nostop;
    q2.n_stop = 1;
    submit(s.get(), q2, &cs[1]);
    // max_tokens smaller than the others
    submit(s.get(), greedy_req(p, 5), &cs[2]);
    // EOS: a chat prompt the model answers briefly, EOS honoured
    std::vector<int32_t> chat = chat_prompt(e, "What is 2+2?");
    Ref rc = alone(e, chat, 64, {}, 0, false);
    ASSERT_EQ(rc.stop, CP_STOP_EOS) << "the model did not end its answer: " << rc.text;
    cp_sched_request q3 = greedy_req(chat, 64);
    q3.ignore_eos = false;
    submit(s.get(), q3, &cs[3]);
    run_all(s.get(), cs);

    EXPECT_EQ(cs[0].finish, CP_FINISH_STOP);
    EXPECT_EQ(cs[0].text, want) << "stop \"" << stop << "\"";
    EXPECT_EQ((int)cs[0].toks.size(), ends + 1);
    EXPECT_EQ(cs[1].finish, CP_FINISH_LENGTH);
    EXPECT_EQ(cs[1].text, ref.text);
    EXPECT_EQ(cs[2].finish, CP_FINISH_LENGTH);
    EXPECT_EQ(cs[2].toks, std::vector<int32_t>(ref.toks.begin(), ref.toks.begin() + 5));
    EXPECT_EQ(cs[3].finish, CP_FINISH_STOP);
    EXPECT_EQ(cs[3].toks, rc.toks);
    EXPECT_EQ(cs[3].text, rc.text);
    EXPECT_EQ(cs[3].n_generated, (int)rc.toks.size());
    for (const Client &c : cs)
        EXPECT_FALSE(c.bad);
}

TEST(Sched, TextHoldsBackSplitCharacters) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    // four-byte characters, which byte-level BPE splits across tokens
    std::vector<int32_t> p =
        encode(e, "Emoji list: \xF0\x9F\x98\x80 \xF0\x9F\x98\x83 \xF0\x9F\x98\x84");
    const int MT = 16;
    Ref ref = alone(e, p, MT);
    int split = 0;
    for (int32_t t : ref.toks) {
        const char *b;
        size_t n;
        ASSERT_EQ(cp_tokenizer_piece(cp_engine_tokenizer(e), t, false, &b, &n), CP_OK);
        for (size_t i = 0; i < n; i++)
            split += ((unsigned char)b[i] & 0xC0) == 0x80 && i == 0;
    }
    ASSERT_GT(split, 0) << "no token of " << ref.text << " continues a character";
    SchedPtr s = make_sched(e, 2);
    std::deque<Client> cs(1);
    std::vector<std::string> parts;
    struct Split {
        static void cb(void *u, const cp_sched_event *ev) {
            auto *v = static_cast<std::vector<std::string> *>(u);
            v->emplace_back(ev->text, ev->len);
        }
    };
    cp_sched_request q = greedy_req(p, MT);
    int64_t id;
    ASSERT_EQ(cp_sched_submit(s.get(), &q, Split::cb, &parts, &id), CP_OK);
    bool worked;
    for (int i = 0; i < 200 && (int)parts.size() < MT; i++)
        ASSERT_EQ(cp_sched_step(s.get(), 0, &worked), CP_OK);
    std::string all;
    for (const std::string &t : parts) {
        all += t;
        // every delivery is whole UTF-8: no lead byte without its continuation
        size_t i = 0;
        while (i < t.size()) {
            unsigned char c = (unsigned char)t[i];
            size_t n = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
            ASSERT_LE(i + n, t.size()) << "split character in \"" << t << "\"";
            i += n;
        }
    }
    EXPECT_EQ(all, ref.text);
}

TEST(Sched, LogprobsMatchLogSoftmax) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    std::vector<int32_t> p = prompt_n(e, 4);
    const int V = cp_model_get_config(cp_engine_model(e))->n_vocab;
    std::vector<float> logits(p.size() * (size_t)V);
    ASSERT_EQ(cp_engine_logits(e, p.data(), (int)p.size(), logits.data()), CP_OK);
    const float *l = logits.data() + (p.size() - 1) * (size_t)V;
    double mx = l[0];
    for (int i = 0; i < V; i++)
        mx = std::max(mx, (double)l[i]);
    double sum = 0;
    for (int i = 0; i < V; i++)
        sum += std::exp(l[i] - mx);
    double lse = mx + std::log(sum);

    SchedPtr s = make_sched(e, 3);
    std::deque<Client> cs(3);
    cp_sched_request q = greedy_req(p, 4);
    q.top_logprobs = 5;
    submit(s.get(), q, &cs[0]);
    q.top_logprobs = 0;
    submit(s.get(), q, &cs[1]);
    // sampled by the forward pass (temperature without top-k): the chosen
    // token's logprob comes with it, wherever the token ranks
    q.sample = {1.5f, 0, 1.0f, 0.0f};
    q.seed = 5;
    submit(s.get(), q, &cs[2]);
    run_all(s.get(), cs);
    ASSERT_EQ(cs[2].lp.size(), 4u);
    EXPECT_EQ(cs[2].lp[0].token, cs[2].toks[0]);
    EXPECT_NEAR(cs[2].lp[0].logprob, l[cs[2].toks[0]] - lse, 1e-4);
    ASSERT_EQ(cs[0].lp.size(), 4u);
    ASSERT_EQ(cs[0].top.size(), 4u);
    int32_t t0 = cs[0].toks[0];
    EXPECT_NEAR(cs[0].lp[0].logprob, l[t0] - lse, 1e-4);
    EXPECT_EQ(cs[0].lp[0].token, t0);
    // greedy: the chosen token is the best alternative; the rest descend
    for (size_t i = 0; i < cs[0].top.size(); i++) {
        EXPECT_EQ(cs[0].top[i][0].token, cs[0].toks[i]);
        EXPECT_FLOAT_EQ(cs[0].top[i][0].logprob, cs[0].lp[i].logprob);
        for (int j = 1; j < 5; j++)
            EXPECT_LE(cs[0].top[i][j].logprob, cs[0].top[i][j - 1].logprob);
    }
    for (int j = 0; j < 5; j++)
        EXPECT_NEAR(cs[0].top[0][j].logprob, l[cs[0].top[0][j].token] - lse, 1e-4);
    EXPECT_EQ(cs[1].lp.size(), 4u); // the chosen token's only
    EXPECT_TRUE(cs[1].top.empty());
}

TEST(Sched, CancelFreesBlocks) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    cp_kv_cache_t kv = cp_engine_kv(e);
    const int n_blocks = cp_kv_cache_n_blocks(kv);
    ASSERT_EQ(cp_kv_cache_n_free(kv), n_blocks);
    SchedPtr s = make_sched(e, 2);
    std::deque<Client> cs(4);
    for (int i = 0; i < 4; i++)
        submit(s.get(), greedy_req(prompt_n(e, 20 + i), 24), &cs[i]);
    bool worked;
    for (int i = 0; i < 5; i++) {
        g_step++;
        ASSERT_EQ(cp_sched_step(s.get(), 0, &worked), CP_OK);
    }
    ASSERT_GT(cs[0].toks.size(), 0u);
    cp_sched_stats st;
    cp_sched_get_stats(s.get(), &st);
    EXPECT_EQ(st.running, 2);
    EXPECT_GT(st.kv_blocks_used, 0);
    cp_sched_cancel(s.get(), cs[0].id); // running
    cp_sched_cancel(s.get(), cs[3].id); // waiting
    cp_sched_cancel(s.get(), 987654);   // unknown: ignored
    g_step++;
    ASSERT_EQ(cp_sched_step(s.get(), 0, &worked), CP_OK);
    EXPECT_EQ(cs[0].finish, CP_FINISH_CANCELLED);
    EXPECT_EQ(cs[3].finish, CP_FINISH_CANCELLED);
    EXPECT_LT(cs[0].toks.size(), 24u);
    EXPECT_TRUE(cs[3].toks.empty());
    run_all(s.get(), cs);
    EXPECT_EQ(cs[1].finish, CP_FINISH_LENGTH);
    EXPECT_EQ(cs[2].finish, CP_FINISH_LENGTH);
    EXPECT_EQ(cs[2].toks.size(), 24u);
    cp_sched_cancel(s.get(), cs[1].id); // finished: ignored
    cp_sched_get_stats(s.get(), &st);
    // blocks still registered in the prefix cache count as free
    EXPECT_EQ(st.kv_blocks_free, n_blocks);
    EXPECT_EQ(st.kv_blocks_used, 0);
    for (const Client &c : cs)
        EXPECT_FALSE(c.bad);

    // cp_sched_free ends what is left and returns every block to the cache
    std::deque<Client> left(2);
    submit(s.get(), greedy_req(prompt_n(e, 30), 24), &left[0]);
    submit(s.get(), greedy_req(prompt_n(e, 31), 24), &left[1]);
    g_step++;
    ASSERT_EQ(cp_sched_step(s.get(), 0, &worked), CP_OK);
    s.reset();
    EXPECT_EQ(left[0].finish, CP_FINISH_CANCELLED);
    EXPECT_EQ(left[1].finish, CP_FINISH_CANCELLED);
    EXPECT_EQ(cp_kv_cache_n_free(kv), n_blocks);
}

void preemption_case(bool no_prefix) {
    cp_engine_t ref_e = shared_engine();
    NEED_ENGINE(ref_e);
    // 128 tokens of KV cache (8 blocks of 16) for 5 requests that each grow
    // to 2 blocks and more
    EnginePtr e = make_engine(1, 128);
    ASSERT_TRUE(e);
    cp_kv_cache_t kv = cp_engine_kv(e.get());
    const int N = 5, MT = 20;
    std::vector<std::vector<int32_t>> ps;
    std::vector<Ref> refs;
    for (int i = 0; i < N; i++) {
        ps.push_back(prompt_n(ref_e, 8 + i));
        refs.push_back(alone(ref_e, ps.back(), MT));
    }
    SchedPtr s = make_sched(e.get(), 8, 0, no_prefix);
    std::deque<Client> cs(N);
    for (int i = 0; i < N; i++)
        submit(s.get(), greedy_req(ps[i], MT), &cs[i]);
    run_all(s.get(), cs);
    for (int i = 0; i < N; i++) {
        EXPECT_EQ(cs[i].toks, refs[i].toks) << "request " << i;
        EXPECT_EQ(cs[i].text, refs[i].text) << "request " << i;
        EXPECT_EQ(cs[i].finish, CP_FINISH_LENGTH);
        EXPECT_FALSE(cs[i].bad);
    }
    cp_sched_stats st;
    cp_sched_get_stats(s.get(), &st);
    EXPECT_GT(st.preemptions, 0);
    if (!no_prefix) EXPECT_GT(st.prefix_lookups, 0);
    EXPECT_EQ(st.generated_tokens, (int64_t)N * MT);
    EXPECT_EQ(st.kv_blocks_free, cp_kv_cache_n_blocks(kv));
    s.reset();
    EXPECT_EQ(cp_kv_cache_n_free(kv), cp_kv_cache_n_blocks(kv));
}

TEST(Sched, PreemptionByRecomputation) {
    preemption_case(true);
}
TEST(Sched, PreemptionWithPrefixCache) {
    preemption_case(false);
}

TEST(Sched, PrefixCacheSharesPromptBlocks) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    std::string common;
    for (int i = 0; common.size() < 600; i++)
        common += "Rule " + std::to_string(i) + ": be kind and brief. ";
    std::vector<int32_t> pre = encode(e, common);
    ASSERT_GE(pre.size(), 64u);
    pre.resize(64);
    std::vector<int32_t> p1 = pre, p2 = pre;
    for (int32_t t : encode(e, " Question: what is the color of the sky?"))
        p1.push_back(t);
    for (int32_t t : encode(e, " Question: name a large animal."))
        p2.push_back(t);
    const int MT = 8;
    Ref r1 = alone(e, p1, MT), r2 = alone(e, p2, MT);

    SchedPtr s = make_sched(e, 4);
    std::deque<Client> a(1), b(1);
    submit(s.get(), greedy_req(p1, MT), &a[0]);
    run_all(s.get(), a);
    EXPECT_EQ(a[0].n_cached, 0);
    cp_sched_stats st;
    cp_sched_get_stats(s.get(), &st);
    EXPECT_EQ(st.prefix_hits, 0);
    submit(s.get(), greedy_req(p2, MT), &b[0]);
    run_all(s.get(), b);
    EXPECT_GE(b[0].n_cached, 48);
    EXPECT_EQ(b[0].n_cached, 64);
    EXPECT_EQ(a[0].toks, r1.toks);
    EXPECT_EQ(b[0].toks, r2.toks) << show(b[0].toks) << " vs " << show(r2.toks);
    cp_sched_get_stats(s.get(), &st);
    EXPECT_EQ(st.prefix_hits, 4);
    EXPECT_GE(st.prefix_lookups, 8);

    // the same prompt again: every full block but the one holding the last
    // token comes from the cache; the output is unchanged
    std::deque<Client> c(1);
    submit(s.get(), greedy_req(p1, MT), &c[0]);
    run_all(s.get(), c);
    EXPECT_EQ(c[0].n_cached, (int)((p1.size() - 1) / 16 * 16));
    EXPECT_EQ(c[0].toks, r1.toks);

    // without the cache: nothing shared, same output
    SchedPtr s2 = make_sched(e, 4, 0, true);
    std::deque<Client> d(1);
    submit(s2.get(), greedy_req(p2, MT), &d[0]);
    run_all(s2.get(), d);
    EXPECT_EQ(d[0].n_cached, 0);
    EXPECT_EQ(d[0].toks, r2.toks);
}

TEST(Sched, FailedStepEndsItsRequestsOnly) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    std::vector<int32_t> pa = prompt_n(e, 50), pb = prompt_n(e, 51), pc = prompt_n(e, 52);
    Ref rc = alone(e, pc, 6);
    setenv("CP_SCHED_FAIL_STEP", "3", 1);
    SchedPtr s = make_sched(e, 2);
    unsetenv("CP_SCHED_FAIL_STEP");
    std::deque<Client> cs(3);
    submit(s.get(), greedy_req(pa, 6), &cs[0]);
    submit(s.get(), greedy_req(pb, 6), &cs[1]);
    submit(s.get(), greedy_req(pc, 6), &cs[2]); // waits: max_running 2
    run_all(s.get(), cs);
    for (int i = 0; i < 2; i++) {
        EXPECT_EQ(cs[i].finish, CP_FINISH_ERROR);
        EXPECT_NE(cs[i].error.find("injected failure"), std::string::npos) << cs[i].error;
        EXPECT_EQ(cs[i].toks.size(), 2u); // steps 1 and 2 ran
    }
    // the scheduler goes on serving
    EXPECT_EQ(cs[2].finish, CP_FINISH_LENGTH);
    EXPECT_EQ(cs[2].toks, rc.toks);
    cp_sched_stats st;
    cp_sched_get_stats(s.get(), &st);
    EXPECT_EQ(st.kv_blocks_used, 0);
    EXPECT_EQ(st.failed_steps, 1);
}

TEST(Sched, AdmissionErrors) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    SchedPtr s = make_sched(e, 2, 0, false, 2);
    std::vector<int32_t> p = prompt_n(e, 0);
    std::deque<Client> cs(3);
    submit(s.get(), greedy_req(p, 4), &cs[0]);
    submit(s.get(), greedy_req(p, 4), &cs[1]);
    cp_sched_request q = greedy_req(p, 4);
    int64_t id = -1;
    EXPECT_EQ(cp_sched_submit(s.get(), &q, client_cb, &cs[2], &id), CP_ERR_BUSY);
    EXPECT_EQ(id, 0);

    std::vector<int32_t> big(500, 100);
    cp_sched_request qb = greedy_req(big, 20);
    EXPECT_EQ(cp_sched_submit(s.get(), &qb, client_cb, &cs[2], &id), CP_ERR_INVALID_ARG);
    std::string msg = cp_last_error();
    EXPECT_NE(msg.find("500"), std::string::npos) << msg;
    EXPECT_NE(msg.find("20"), std::string::npos) << msg;
    EXPECT_NE(msg.find("512"), std::string::npos) << msg;
    cp_sched_request qe = greedy_req(p, 4);
    qe.n_prompt = 0;
    EXPECT_EQ(cp_sched_submit(s.get(), &qe, client_cb, &cs[2], &id), CP_ERR_INVALID_ARG);
    qe = greedy_req(p, 0);
    EXPECT_EQ(cp_sched_submit(s.get(), &qe, client_cb, &cs[2], &id), CP_ERR_INVALID_ARG);
    std::vector<int32_t> badtok = {1, 2, 1 << 30};
    qe = greedy_req(badtok, 4);
    EXPECT_EQ(cp_sched_submit(s.get(), &qe, client_cb, &cs[2], &id), CP_ERR_INVALID_ARG);
    qe = greedy_req(p, 4);
    qe.top_logprobs = CP_SCHED_MAX_LOGPROBS + 1;
    EXPECT_EQ(cp_sched_submit(s.get(), &qe, client_cb, &cs[2], &id), CP_ERR_INVALID_ARG);
    qe.top_logprobs = -1;
    qe.n_stop = CP_SCHED_MAX_STOP + 1;
    EXPECT_EQ(cp_sched_submit(s.get(), &qe, client_cb, &cs[2], &id), CP_ERR_INVALID_ARG);

    cp_sched_drain(s.get());
    EXPECT_EQ(cp_sched_submit(s.get(), &q, client_cb, &cs[2], &id), CP_ERR_UNSUPPORTED);
    // the queued requests still run to the end
    cs.pop_back();
    run_all(s.get(), cs);
    EXPECT_EQ(cs[0].finish, CP_FINISH_LENGTH);
    EXPECT_EQ(cs[1].finish, CP_FINISH_LENGTH);
    EXPECT_EQ(cs[0].toks, cs[1].toks);
    EXPECT_EQ(cs[1].n_cached, 0); // admitted in the same step as the first
}

TEST(Sched, SubmitFromAnotherThreadAndWake) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    SchedPtr s = make_sched(e, 4);
    const int N = 6;
    std::deque<Client> cs(N);
    std::vector<std::vector<int32_t>> ps;
    for (int i = 0; i < N; i++)
        ps.push_back(prompt_n(e, 40 + i));
    std::atomic<bool> stop{false};
    std::atomic<int> done{0};
    // the stepping loop on its own thread, as a server runs it
    std::thread loop([&] {
        while (!stop.load()) {
            bool worked;
            EXPECT_EQ(cp_sched_step(s.get(), -1, &worked), CP_OK);
        }
    });
    std::vector<std::thread> submitters;
    struct Done {
        Client *c;
        std::atomic<int> *done;
    };
    std::deque<Done> ctx;
    for (int i = 0; i < N; i++)
        ctx.push_back({&cs[i], &done});
    auto cb = [](void *u, const cp_sched_event *ev) {
        Done *d = static_cast<Done *>(u);
        client_cb(d->c, ev);
        if (ev->finish != CP_FINISH_NONE) d->done->fetch_add(1);
    };
    for (int i = 0; i < N; i++)
        submitters.emplace_back([&, i] {
            cp_sched_request q = greedy_req(ps[i], 8);
            int64_t id;
            EXPECT_EQ(cp_sched_submit(s.get(), &q, cb, &ctx[i], &id), CP_OK);
            cp_sched_stats st;
            cp_sched_get_stats(s.get(), &st);
            if (i == N - 1) cp_sched_cancel(s.get(), id);
        });
    for (std::thread &t : submitters)
        t.join();
    auto t0 = std::chrono::steady_clock::now();
    while (done.load() < N && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60))
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    EXPECT_EQ(done.load(), N);
    // the loop now blocks in its wait with nothing to do; wake ends it
    stop = true;
    cp_sched_wake(s.get());
    loop.join();
    for (int i = 0; i < N - 1; i++) {
        EXPECT_TRUE(cs[i].finish == CP_FINISH_LENGTH) << i;
        EXPECT_EQ(cs[i].toks.size(), 8u);
    }
    EXPECT_TRUE(cs[N - 1].finish == CP_FINISH_LENGTH || cs[N - 1].finish == CP_FINISH_CANCELLED);

    // a bounded wait with nothing queued returns without work
    bool worked = true;
    auto w0 = std::chrono::steady_clock::now();
    ASSERT_EQ(cp_sched_step(s.get(), 30, &worked), CP_OK);
    EXPECT_FALSE(worked);
    EXPECT_GE(std::chrono::steady_clock::now() - w0, std::chrono::milliseconds(25));
}

// ---- pipelined steps ----------------------------------------------------------
// A pipeline stand-in: forward only records a step, finish computes the
// oldest one, so up to `depth` steps are in flight as across pipeline
// stages, and the hooks check what the scheduler promises them.
struct FakePipe {
    cp_model_t m = nullptr;
    cp_kv_cache_t kv = nullptr;
    struct Step {
        std::vector<int32_t> tokens, pos, seq, tables, logit_rows;
        int n_seq = 0, max_blocks = 0;
        const cp_logit_top *out = nullptr;
        // each sequence (named by its first block), the blocks it reaches,
        // and whether a token of it is sampled
        std::vector<std::pair<int32_t, int32_t>> reach;
        std::vector<int32_t> sampled;
    };
    std::deque<Step> flying;
    size_t most = 0;     // most steps in flight at once
    int most_seqs = 0;   // most sequences in one step
    int finishes = 0, fail_finish = 0;
    std::string problem; // the first broken promise
    int chunk_overlap = 0; // steps started while the same prompt's previous chunk was in flight
};

cp_status fake_forward(void *user, const cp_batch *b, const cp_logit_top *out) {
    FakePipe *p = static_cast<FakePipe *>(user);
    FakePipe::Step st;
    st.tokens.assign(b->tokens, b->tokens + b->n_tok);
    st.pos.assign(b->pos, b->pos + b->n_tok);
    st.seq.assign(b->seq, b->seq + b->n_tok);
    st.n_seq = b->n_seq;
    st.max_blocks = b->max_blocks;
    st.logit_rows.assign(b->logit_rows, b->logit_rows + b->n_logits);
    // a sequence's blocks belong to it alone, and a sequence waiting for
    // its sample is in no other step; a prompt's chunks may overlap
    const int bs = cp_kv_cache_block_size(p->kv);
    auto fail = [p](const std::string &m) {
        if (p->problem.empty()) p->problem = m;
    };
    for (int i = 0; i < b->n_seq; i++) {
        int last = -1;
        for (int t = 0; t < b->n_tok; t++)
            if (b->seq[t] == i) last = b->pos[t];
        const int32_t *tab = b->block_tables + (size_t)i * b->max_blocks;
        for (int j = 0; j <= last / bs; j++)
            st.reach.emplace_back(tab[0], tab[j]);
        for (int j = 0; j < b->n_logits; j++)
            if (b->seq[b->logit_rows[j]] == i) st.sampled.push_back(tab[0]);
        for (const FakePipe::Step &o : p->flying) {
            for (int32_t k : o.sampled)
                if (k == tab[0]) fail("a sequence scheduled while its sample is in flight");
            for (auto [k, blk] : o.reach) {
                if (k == tab[0]) p->chunk_overlap++;
                for (int j = 0; j <= last / bs; j++)
                    if (k != tab[0] && blk == tab[j]) fail("block " + std::to_string(blk) + " in two sequences");
            }
        }
    }
    st.tables.assign(b->block_tables, b->block_tables + (size_t)b->n_seq * b->max_blocks);
    st.out = out;
    p->flying.push_back(std::move(st));
    p->most = std::max(p->most, p->flying.size());
    p->most_seqs = std::max(p->most_seqs, b->n_seq);
    return CP_OK;
}

cp_status fake_finish(void *user, const cp_logit_top *out) {
    FakePipe *p = static_cast<FakePipe *>(user);
    if (p->flying.empty() || p->flying.front().out != out) {
        if (p->problem.empty()) p->problem = "finish of a step that is not the oldest in flight";
        return CP_ERROR(CP_ERR_INTERNAL, "bad finish");
    }
    FakePipe::Step st = std::move(p->flying.front());
    p->flying.pop_front();
    if (++p->finishes == p->fail_finish) return CP_ERROR(CP_ERR_TIMEOUT, "injected pipeline failure");
    cp_batch b = {};
    b.n_tok = (int)st.tokens.size();
    b.tokens = st.tokens.data();
    b.pos = st.pos.data();
    b.seq = st.seq.data();
    b.block_tables = st.tables.data();
    b.n_seq = st.n_seq;
    b.max_blocks = st.max_blocks;
    b.logit_rows = st.logit_rows.data();
    b.n_logits = (int)st.logit_rows.size();
    return cp_model_forward_top(p->m, p->kv, &b, out);
}

SchedPtr make_piped(cp_engine_t e, FakePipe *p, int depth, int max_running, int prefill_chunk = 0) {
    p->m = cp_engine_model(e);
    p->kv = cp_engine_kv(e);
    cp_sched_opts o = {};
    o.max_running = max_running;
    o.no_prefix_cache = true; // each block then belongs to one sequence
    o.prefill_chunk = prefill_chunk;
    o.forward = fake_forward;
    o.finish = fake_finish;
    o.depth = depth;
    o.hook_user = p;
    cp_sched_t s = nullptr;
    EXPECT_EQ(cp_sched_init(e, &o, &s), CP_OK) << cp_last_error();
    return SchedPtr(s);
}

TEST(Sched, PipelinedStepsStayApartAndMatchAlone) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    const int N = 12, depth = 3;
    auto mt = [](int i) { return 5 + i % 6; };
    std::vector<std::vector<int32_t>> prompts;
    std::vector<Ref> refs;
    for (int i = 0; i < N; i++) {
        prompts.push_back(prompt_n(e, 60 + i));
        refs.push_back(alone(e, prompts.back(), mt(i)));
    }
    cp_sample_params sp = {};
    sp.temperature = 0.8f;
    sp.top_k = 20;
    const std::vector<int32_t> pk = prompt_n(e, 3);
    Ref seeded = alone(e, pk, 9, sp, 77);
    // a long prompt in chunks of 16: its chunks follow each other without
    // waiting for the previous one to come back
    std::vector<int32_t> longp;
    for (int i = 0; i < 8; i++) {
        std::vector<int32_t> q = prompt_n(e, 90 + i);
        longp.insert(longp.end(), q.begin(), q.end());
    }
    Ref long_ref = alone(e, longp, 6);

    FakePipe pipe;
    SchedPtr s = make_piped(e, &pipe, depth, 8, 16);
    std::deque<Client> lone(1);
    submit(s.get(), greedy_req(longp, 6), &lone[0]);
    run_all(s.get(), lone);
    EXPECT_EQ(lone[0].toks, long_ref.toks) << show(lone[0].toks) << " vs " << show(long_ref.toks);
    EXPECT_GE(pipe.chunk_overlap, (int)longp.size() / 16 - 2) << longp.size() << " prompt tokens";
    std::deque<Client> cs(N + 1);
    for (int i = 0; i < N; i++)
        submit(s.get(), greedy_req(prompts[i], mt(i)), &cs[i]);
    cp_sched_request q = greedy_req(pk, 9);
    q.sample = sp;
    q.seed = 77;
    submit(s.get(), q, &cs[N]);
    run_all(s.get(), cs);
    EXPECT_EQ(pipe.problem, "");
    EXPECT_EQ(pipe.most, (size_t)depth); // the pipeline filled
    EXPECT_LE(pipe.most_seqs, (8 + depth - 1) / depth); // a share of the running sequences each
    EXPECT_TRUE(pipe.flying.empty());
    for (int i = 0; i < N; i++) {
        EXPECT_EQ(cs[i].toks, refs[i].toks) << "request " << i << ": " << show(cs[i].toks) << " vs "
                                            << show(refs[i].toks);
        EXPECT_EQ(cs[i].text, refs[i].text) << "request " << i;
        EXPECT_EQ(cs[i].finish, CP_FINISH_LENGTH);
        EXPECT_FALSE(cs[i].bad);
    }
    EXPECT_EQ(cs[N].toks, seeded.toks) << show(cs[N].toks) << " vs " << show(seeded.toks);
    cp_sched_stats st;
    cp_sched_get_stats(s.get(), &st);
    EXPECT_EQ(st.kv_blocks_used, 0);
    EXPECT_EQ(st.running, 0);
}

TEST(Sched, PipelinedFailureAndCancelInFlight) {
    cp_engine_t e = shared_engine();
    NEED_ENGINE(e);
    FakePipe pipe;
    pipe.fail_finish = 4; // the fourth step to come back fails
    SchedPtr s = make_piped(e, &pipe, 2, 4);
    std::deque<Client> cs(4);
    for (int i = 0; i < 4; i++)
        submit(s.get(), greedy_req(prompt_n(e, 80 + i), 12), &cs[i]);
    // two steps go out (two sequences each), the first comes back
    for (int i = 0; i < 2; i++) {
        bool worked = false;
        ASSERT_EQ(cp_sched_step(s.get(), 0, &worked), CP_OK);
        EXPECT_TRUE(worked);
    }
    EXPECT_EQ(pipe.flying.size(), 1u);
    // cancel a request of the step still in flight: it ends when that
    // step is back, and its blocks are freed
    int victim = -1;
    for (int i = 0; i < 4; i++)
        if (cs[i].toks.empty()) victim = i; // not back yet: in flight
    ASSERT_GE(victim, 0);
    cp_sched_cancel(s.get(), cs[victim].id);
    run_all(s.get(), cs);
    EXPECT_EQ(pipe.problem, "");
    EXPECT_EQ(cs[victim].finish, CP_FINISH_CANCELLED);
    int failed = 0, full = 0;
    for (int i = 0; i < 4; i++) {
        if (i == victim) continue;
        if (cs[i].finish == CP_FINISH_ERROR) {
            failed++;
            EXPECT_NE(cs[i].error.find("injected pipeline failure"), std::string::npos) << cs[i].error;
        } else {
            EXPECT_EQ(cs[i].finish, CP_FINISH_LENGTH);
            full++;
        }
    }
    EXPECT_GE(failed, 1); // the failed step's requests only
    EXPECT_GE(full, 1);
    cp_sched_stats st;
    cp_sched_get_stats(s.get(), &st);
    EXPECT_EQ(st.kv_blocks_used, 0);
    EXPECT_EQ(st.failed_steps, 1);
}

} // namespace
