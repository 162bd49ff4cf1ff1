// test_distill.cc - distillation data from the default model: the
// continuations equal greedy generation, every row is the log-softmax of
// cp_engine_logits (computed here independently), the top-k rows are
// sorted, distinct and within the vocabulary, --completion-only keeps the
// tail rows, bad prompts files and occupied directories are refused, and
// two pipeline ranks write what one rank writes.
#include <gtest/gtest.h>
#include <jansson.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

extern "C" {
#include "cp_distill.h"
#include "cp_model.h"
#include "cp_runtime.h"
#include "cp_tokenizer.h"
}

namespace {

struct EngineDel {
    void operator()(cp_engine *e) const { cp_engine_free(e); }
};
using EnginePtr = std::unique_ptr<cp_engine, EngineDel>;
struct PromptsDel {
    void operator()(cp_distill_prompts *p) const { cp_distill_prompts_free(p); }
};
using PromptsPtr = std::unique_ptr<cp_distill_prompts, PromptsDel>;

std::string model() {
    const char *m = getenv("CP_TEST_MODEL");
    return m && *m ? m : CP_SOURCE_DIR "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

bool have_model() {
    return std::ifstream(model()).good();
}

// a fresh per-process path (ctest runs the tests of a file concurrently)
std::string tmp(const std::string &name) {
    return ::testing::TempDir() + "distill_" + std::to_string(getpid()) + "_" + name;
}

std::string slurp(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void rm_rf(const std::string &dir) {
    (void)!system(("rm -rf '" + dir + "'").c_str());
}

// The prompts every test uses: a plain prompt (chat template by default),
// a blank line, a conversation, a prompt with a numeric id.
const char *PROMPTS =
    "{\"prompt\": \"What is the capital of France?\", \"id\": \"france\"}\n"
    "\n"
    "{\"messages\": [{\"role\": \"system\", \"content\": \"Answer in one word.\"}, "
    "{\"role\": \"user\", \"content\": \"What color is the sky?\"}]}\n"
    "{\"prompt\": \"Write a haiku about rain.\", \"id\": 41, \"extra\": [1, 2]}\n";

std::string write_prompts(const std::string &name, const std::string &body) {
    std::string p = tmp(name);
    std::ofstream(p, std::ios::binary) << body;
    return p;
}

struct Sample {
    std::string id_json, completion, finish;
    std::vector<int32_t> prompt, gen;
    int64_t row_begin = 0, n_rows = 0;
};

struct Data {
    json_t *meta = nullptr;
    std::vector<Sample> samples;
    int K = 0;
    int64_t rows = 0;
    std::vector<int32_t> ids; // [rows][K]
    std::vector<float> lps;   // [rows][K]
    std::vector<float> tok;   // [rows]
    ~Data() { json_decref(meta); }
};

std::vector<int32_t> ints(const json_t *a) {
    std::vector<int32_t> v;
    for (size_t i = 0; i < json_array_size(a); i++)
        v.push_back((int32_t)json_integer_value(json_array_get(a, i)));
    return v;
}

template <class T> std::vector<T> read_array(const std::string &path) {
    std::string b = slurp(path);
    std::vector<T> v(b.size() / sizeof(T));
    memcpy(v.data(), b.data(), v.size() * sizeof(T)); // little-endian hosts
    return v;
}

// Reads an output directory back, checking the files agree in size.
void load(const std::string &dir, Data *d) {
    json_error_t err;
    d->meta = json_load_file((dir + "/meta.json").c_str(), 0, &err);
    ASSERT_TRUE(d->meta) << err.text;
    d->K = (int)json_integer_value(json_object_get(d->meta, "top_k"));
    d->rows = json_integer_value(json_object_get(json_object_get(d->meta, "counts"), "rows"));
    std::ifstream f(dir + "/samples.jsonl");
    for (std::string line; std::getline(f, line);) {
        json_t *o = json_loads(line.c_str(), 0, &err);
        ASSERT_TRUE(o) << line << ": " << err.text;
        Sample s;
        char *id = json_dumps(json_object_get(o, "id"), JSON_COMPACT | JSON_ENCODE_ANY);
        s.id_json = id;
        free(id);
        s.prompt = ints(json_object_get(o, "prompt_ids"));
        s.gen = ints(json_object_get(o, "completion_ids"));
        s.completion = json_string_value(json_object_get(o, "completion"));
        s.finish = json_string_value(json_object_get(o, "finish_reason"));
        s.row_begin = json_integer_value(json_object_get(o, "row_begin"));
        s.n_rows = json_integer_value(json_object_get(o, "n_rows"));
        d->samples.push_back(s);
        json_decref(o);
    }
    d->ids = read_array<int32_t>(dir + "/topk_ids.bin");
    d->lps = read_array<float>(dir + "/topk_logprobs.bin");
    d->tok = read_array<float>(dir + "/token_logprobs.bin");
    ASSERT_EQ((int64_t)d->ids.size(), d->rows * d->K);
    ASSERT_EQ((int64_t)d->lps.size(), d->rows * d->K);
    ASSERT_EQ((int64_t)d->tok.size(), d->rows);
    for (int i = 0; i < 5; i++) // no temporary file is left behind
        EXPECT_FALSE(
            std::ifstream(dir + "/" +
                          std::vector<std::string>{"meta.json", "samples.jsonl", "topk_ids.bin",
                                                   "topk_logprobs.bin", "token_logprobs.bin"}[i] +
                          ".tmp")
                .good());
}

EnginePtr make_engine() {
    if (!have_model()) return nullptr;
    std::string path = model();
    cp_engine_opts o = {};
    o.model_path = path.c_str();
    o.n_threads = 2;
    o.n_ctx = 256;
    o.n_seq = 1;
    o.kv_f32 = true;
    cp_engine_t e = nullptr;
    EXPECT_EQ(cp_engine_init(&o, &e), CP_OK) << cp_last_error();
    return EnginePtr(e);
}

cp_distill_opts base_opts(int K, int max_tokens) {
    cp_distill_opts o = {};
    o.top_k = K;
    o.max_tokens = max_tokens;
    o.write = true;
    return o;
}

void distill(cp_engine_t e, const std::string &prompts, const std::string &dir,
             const cp_distill_opts &o, cp_distill_result *res) {
    cp_distill_prompts_t p = nullptr;
    ASSERT_EQ(cp_distill_prompts_load(prompts.c_str(), &p), CP_OK) << cp_last_error();
    PromptsPtr pp(p);
    ASSERT_EQ(cp_distill_prepare_dir(dir.c_str(), true), CP_OK) << cp_last_error();
    ASSERT_EQ(cp_distill_run(e, p, dir.c_str(), &o, res), CP_OK) << cp_last_error();
}

// The structural promises of every row: sorted descending, distinct ids in
// the vocabulary, log-probabilities <= 0 whose probabilities sum to <= 1.
void check_rows(const Data &d, int V) {
    for (int64_t r = 0; r < d.rows; r++) {
        const int32_t *id = &d.ids[r * d.K];
        const float *lp = &d.lps[r * d.K];
        std::set<int32_t> seen;
        double mass = 0;
        for (int k = 0; k < d.K; k++) {
            ASSERT_GE(id[k], 0) << "row " << r;
            ASSERT_LT(id[k], V) << "row " << r;
            ASSERT_TRUE(seen.insert(id[k]).second) << "row " << r << " repeats id " << id[k];
            ASSERT_LE(lp[k], 0.0f) << "row " << r;
            if (k) ASSERT_LE(lp[k], lp[k - 1]) << "row " << r << " is not sorted at " << k;
            mass += std::exp((double)lp[k]);
        }
        EXPECT_LE(mass, 1.0 + 1e-5) << "row " << r;
        EXPECT_LE(d.tok[r], 0.0f) << "row " << r;
    }
}

// log-softmax of one row of logits, in double
std::vector<double> log_softmax(const float *z, int V) {
    double mx = *std::max_element(z, z + V), s = 0;
    for (int v = 0; v < V; v++)
        s += std::exp((double)z[v] - mx);
    std::vector<double> out(V);
    for (int v = 0; v < V; v++)
        out[v] = (double)z[v] - mx - std::log(s);
    return out;
}

// Greedy continuation as cp_engine_generate gives it (EOG tokens are not
// passed to the callback).
std::vector<int32_t> greedy(cp_engine_t e, const std::vector<int32_t> &prompt, int n) {
    std::vector<int32_t> out;
    cp_gen_params gp = {};
    gp.sample.temperature = 0;
    gp.max_tokens = n;
    auto cb = [](void *u, int32_t t, const char *, size_t) {
        static_cast<std::vector<int32_t> *>(u)->push_back(t);
        return true;
    };
    EXPECT_EQ(cp_engine_generate(e, prompt.data(), (int)prompt.size(), &gp, cb, &out, nullptr),
              CP_OK);
    return out;
}

TEST(Distill, RowsAreTheTeachersLogSoftmax) {
    EnginePtr e = make_engine();
    if (!e) GTEST_SKIP() << "default model not present";
    cp_tokenizer_t tok = cp_engine_tokenizer(e.get());
    const int V = cp_model_get_config(cp_engine_model(e.get()))->n_vocab;
    std::string prompts = write_prompts("p.jsonl", PROMPTS), dir = tmp("full");
    const int K = 8, N = 8;
    cp_distill_result res;
    distill(e.get(), prompts, dir, base_opts(K, N), &res);
    Data d;
    load(dir, &d);
    if (HasFatalFailure()) return;
    ASSERT_EQ(d.samples.size(), 3u);
    EXPECT_EQ(res.n_samples, 3);
    EXPECT_TRUE(res.chat); // the model has a chat template
    EXPECT_EQ(d.samples[0].id_json, "\"france\"");
    EXPECT_EQ(d.samples[1].id_json, "2"); // the 0-based line, blank lines counted
    EXPECT_EQ(d.samples[2].id_json, "41");
    EXPECT_EQ(d.K, K);
    EXPECT_EQ(json_integer_value(json_object_get(d.meta, "vocab_size")), V);
    EXPECT_STREQ(json_string_value(json_object_get(d.meta, "format")), "cparallel-distill");
    EXPECT_EQ(json_integer_value(json_object_get(d.meta, "version")), 1);
    json_t *tk = json_object_get(d.meta, "tokenizer");
    EXPECT_EQ(json_integer_value(json_object_get(tk, "eos_id")), cp_tokenizer_eos(tok));
    EXPECT_EQ(json_integer_value(json_object_get(tk, "bos_id")), cp_tokenizer_bos(tok));
    check_rows(d, V);

    // the prompts as the chat template gives them
    std::vector<std::vector<cp_chat_msg>> convs = {
        {{"user", "What is the capital of France?"}},
        {{"system", "Answer in one word."}, {"user", "What color is the sky?"}},
        {{"user", "Write a haiku about rain."}}};
    int64_t row = 0;
    int n_checked = 0;
    for (size_t i = 0; i < d.samples.size(); i++) {
        const Sample &s = d.samples[i];
        SCOPED_TRACE("sample " + std::to_string(i));
        int32_t *ids = nullptr;
        size_t n = 0;
        ASSERT_EQ(cp_tokenizer_encode_chat(tok, convs[i].data(), convs[i].size(),
                                           CP_CHAT_GENERATION_PROMPT, &ids, &n, nullptr),
                  CP_OK);
        EXPECT_EQ(s.prompt, std::vector<int32_t>(ids, ids + n));
        free(ids);
        // the continuation is greedy generation's, plus the end token on "stop"
        std::vector<int32_t> want = greedy(e.get(), s.prompt, N);
        std::vector<int32_t> got = s.gen;
        if (s.finish == "stop") {
            ASSERT_FALSE(got.empty());
            EXPECT_TRUE(cp_tokenizer_is_eog(tok, got.back()));
            got.pop_back();
        } else {
            EXPECT_EQ(s.finish, "length");
            EXPECT_EQ((int)got.size(), N);
        }
        EXPECT_EQ(got, want);
        EXPECT_FALSE(s.completion.empty());
        // one row per known next token, back to back
        std::vector<int32_t> t = s.prompt;
        t.insert(t.end(), s.gen.begin(), s.gen.end());
        EXPECT_EQ(s.row_begin, row);
        EXPECT_EQ(s.n_rows, (int64_t)t.size() - 1);
        row += s.n_rows;
        // every row against cp_engine_logits, computed here
        const int n_in = (int)t.size() - 1;
        std::vector<float> z((size_t)n_in * V);
        ASSERT_EQ(cp_engine_logits(e.get(), t.data(), n_in, z.data()), CP_OK);
        for (int j = 0; j < n_in; j++) {
            std::vector<double> lp = log_softmax(&z[(size_t)j * V], V);
            const int64_t r = s.row_begin + j;
            EXPECT_NEAR(d.tok[r], lp[t[j + 1]], 1e-4) << "row " << j;
            std::vector<int> order(V);
            for (int v = 0; v < V; v++)
                order[v] = v;
            std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int a, int b) {
                return lp[a] > lp[b] || (lp[a] == lp[b] && a < b);
            });
            for (int k = 0; k < K; k++) {
                EXPECT_NEAR(d.lps[r * K + k], lp[order[k]], 1e-4) << "row " << j << " rank " << k;
                EXPECT_NEAR(lp[d.ids[r * K + k]], d.lps[r * K + k], 1e-4) << "row " << j;
            }
            // greedy: each generated token is the row's top-1
            if (j >= (int)s.prompt.size() - 1 && lp[order[0]] - lp[order[1]] > 1e-3)
                EXPECT_EQ(d.ids[r * K], t[j + 1]) << "row " << j;
            n_checked++;
        }
    }
    EXPECT_EQ(row, d.rows);
    EXPECT_EQ(res.n_rows, d.rows);
    EXPECT_GT(n_checked, 50);

    // --completion-only: the tail of each sample's rows
    std::string dir2 = tmp("tail");
    cp_distill_opts o = base_opts(K, N);
    o.completion_only = true;
    cp_distill_result res2;
    distill(e.get(), prompts, dir2, o, &res2);
    Data c;
    load(dir2, &c);
    if (HasFatalFailure()) return;
    ASSERT_EQ(c.samples.size(), d.samples.size());
    EXPECT_EQ(json_is_true(json_object_get(c.meta, "completion_only")), true);
    int64_t crow = 0;
    for (size_t i = 0; i < c.samples.size(); i++) {
        const Sample &a = d.samples[i], &b = c.samples[i];
        EXPECT_EQ(b.gen, a.gen);
        EXPECT_EQ(b.prompt, a.prompt);
        EXPECT_EQ(b.n_rows, (int64_t)b.gen.size());
        EXPECT_EQ(b.row_begin, crow);
        crow += b.n_rows;
        const int64_t skip = a.n_rows - b.n_rows;
        for (int64_t j = 0; j < b.n_rows; j++) {
            const int64_t ra = a.row_begin + skip + j, rb = b.row_begin + j;
            EXPECT_NEAR(c.tok[rb], d.tok[ra], 1e-5);
            for (int k = 0; k < K; k++) {
                EXPECT_EQ(c.ids[rb * K + k], d.ids[ra * K + k]);
                EXPECT_NEAR(c.lps[rb * K + k], d.lps[ra * K + k], 1e-5);
            }
        }
    }
    EXPECT_EQ(crow, c.rows);
    rm_rf(dir);
    rm_rf(dir2);
    unlink(prompts.c_str());
}

TEST(Distill, RawPromptsAndSampling) {
    EnginePtr e = make_engine();
    if (!e) GTEST_SKIP() << "default model not present";
    cp_tokenizer_t tok = cp_engine_tokenizer(e.get());
    std::string prompts = write_prompts("raw.jsonl", "{\"prompt\": \"The capital of France is\"}\n"
                                                     "{\"prompt\": \"One, two, three,\"}\n");
    std::string dir = tmp("raw");
    cp_distill_opts o = base_opts(4, 6);
    o.chat = CP_DISTILL_CHAT_OFF;
    o.temperature = 0.9f;
    o.seed = 1234;
    cp_distill_result res;
    distill(e.get(), prompts, dir, o, &res);
    Data a;
    load(dir, &a);
    if (HasFatalFailure()) return;
    ASSERT_EQ(a.samples.size(), 2u);
    int32_t *ids = nullptr;
    size_t n = 0;
    const char *text = "The capital of France is";
    ASSERT_EQ(cp_tokenizer_encode(tok, text, strlen(text), true, false, &ids, &n), CP_OK);
    EXPECT_EQ(a.samples[0].prompt, std::vector<int32_t>(ids, ids + n));
    free(ids);
    check_rows(a, cp_model_get_config(cp_engine_model(e.get()))->n_vocab);
    // the same seed samples the same continuations
    std::string dir2 = tmp("raw2");
    distill(e.get(), prompts, dir2, o, &res);
    Data b;
    load(dir2, &b);
    if (HasFatalFailure()) return;
    for (size_t i = 0; i < a.samples.size(); i++)
        EXPECT_EQ(a.samples[i].gen, b.samples[i].gen);
    EXPECT_EQ(slurp(dir + "/topk_ids.bin"), slurp(dir2 + "/topk_ids.bin"));
    // "messages" cannot go without the template
    std::string conv =
        write_prompts("conv.jsonl", "{\"prompt\": \"hi\"}\n{\"messages\": "
                                    "[{\"role\": \"user\", \"content\": \"hi\"}]}\n");
    cp_distill_prompts_t p = nullptr;
    ASSERT_EQ(cp_distill_prompts_load(conv.c_str(), &p), CP_OK);
    PromptsPtr pp(p);
    EXPECT_EQ(cp_distill_prompts_count(p), 2u);
    EXPECT_EQ(cp_distill_prompts_n_chat(p), 1u);
    EXPECT_EQ(cp_distill_run(e.get(), p, dir2.c_str(), &o, &res), CP_ERR_INVALID_ARG);
    EXPECT_NE(std::string(cp_last_error()).find(conv + ":2:"), std::string::npos)
        << cp_last_error();
    o.top_k = 300;
    o.chat = CP_DISTILL_CHAT_AUTO;
    EXPECT_EQ(cp_distill_run(e.get(), p, dir2.c_str(), &o, &res), CP_ERR_INVALID_ARG);
    rm_rf(dir);
    rm_rf(dir2);
    unlink(prompts.c_str());
    unlink(conv.c_str());
}

TEST(Distill, MalformedPromptsNameTheLine) {
    struct {
        const char *body, *expect;
    } cases[] = {
        {"{\"prompt\": \"a\"}\n\n{\"prompt\": \"b\"\n", ":3: not valid JSON"},
        {"{\"prompt\": 3}\n", ":1: \"prompt\" must be a string"},
        {"{\"prompt\": \"a\"}\n[1, 2]\n", ":2: expected a JSON object"},
        {"{\"text\": \"a\"}\n", ":1: the object has neither"},
        {"{\"prompt\": \"a\", \"messages\": []}\n",
         ":1: give \"prompt\" or \"messages\", not both"},
        {"{\"messages\": []}\n", ":1: \"messages\" must be a non-empty array"},
        {"{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n", ":1: messages[0].role"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": 5}]}\n", ":1: messages[0].content"},
        {"\n  \n", "holds no prompt"},
    };
    for (auto &c : cases) {
        std::string p = write_prompts("bad.jsonl", c.body);
        cp_distill_prompts_t ps = nullptr;
        EXPECT_EQ(cp_distill_prompts_load(p.c_str(), &ps), CP_ERR_FORMAT) << c.body;
        EXPECT_EQ(ps, nullptr);
        EXPECT_NE(std::string(cp_last_error()).find(c.expect), std::string::npos)
            << c.body << "\n"
            << cp_last_error();
        unlink(p.c_str());
    }
    cp_distill_prompts_t ps = nullptr;
    EXPECT_EQ(cp_distill_prompts_load("/nonexistent/p.jsonl", &ps), CP_ERR_IO);
}

TEST(Distill, OutputDirectoryRules) {
    std::string dir = tmp("dir");
    rm_rf(dir);
    ASSERT_EQ(cp_distill_prepare_dir(dir.c_str(), false), CP_OK); // created
    ASSERT_EQ(cp_distill_prepare_dir(dir.c_str(), false), CP_OK); // empty is fine
    std::ofstream(dir + "/meta.json") << "{}";
    std::ofstream(dir + "/notes.txt") << "mine";
    EXPECT_EQ(cp_distill_prepare_dir(dir.c_str(), false), CP_ERR_IO);
    EXPECT_NE(std::string(cp_last_error()).find("not empty"), std::string::npos);
    EXPECT_TRUE(std::ifstream(dir + "/meta.json").good());
    EXPECT_EQ(cp_distill_prepare_dir(dir.c_str(), true), CP_OK);
    EXPECT_FALSE(std::ifstream(dir + "/meta.json").good()); // no longer claims to be whole
    EXPECT_TRUE(std::ifstream(dir + "/notes.txt").good());  // not ours: kept
    std::string file = tmp("file");
    std::ofstream(file) << "x";
    EXPECT_EQ(cp_distill_prepare_dir(file.c_str(), true), CP_ERR_IO);
    EXPECT_NE(std::string(cp_last_error()).find("not a directory"), std::string::npos);
    rm_rf(dir);
    unlink(file.c_str());
}

// ---- the command -------------------------------------------------------

struct Result {
    int code = -1;
    std::string out, err;
};

std::string exe() {
    const char *bin = getenv("CP_CPARALLEL");
    return bin ? bin : std::string(CP_BINARY_DIR) + "/cparallel";
}

Result run_cmd(const std::string &prefix, const std::string &args) {
    std::string o = tmp("out.txt"), er = tmp("err.txt");
    std::string cmd = prefix + exe() + " " + args + " >" + o + " 2>" + er + " </dev/null";
    int st = system(cmd.c_str());
    Result r;
    r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    r.out = slurp(o);
    r.err = slurp(er);
    return r;
}

Result run(const std::string &args) {
    return run_cmd("", args);
}

Result run_mpi(int np, const std::string &args) {
    return run_cmd(
        "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 300 mpirun -np " +
            std::to_string(np) + " --oversubscribe ",
        args);
}

int count_lines(const std::string &s) {
    return (int)std::count(s.begin(), s.end(), '\n');
}

bool exists(const std::string &p) {
    struct stat sb;
    return stat(p.c_str(), &sb) == 0;
}

// Rows of two runs agree: the same ids and log-probabilities within tol
// (two ids may swap where their log-probabilities are within tol).
void expect_same_rows(const Data &a, const Data &b, double tol) {
    ASSERT_EQ(a.rows, b.rows);
    ASSERT_EQ(a.K, b.K);
    for (int64_t r = 0; r < a.rows; r++) {
        EXPECT_NEAR(a.tok[r], b.tok[r], tol) << "row " << r;
        for (int k = 0; k < a.K; k++) {
            EXPECT_NEAR(a.lps[r * a.K + k], b.lps[r * a.K + k], tol) << "row " << r;
            if (a.ids[r * a.K + k] != b.ids[r * a.K + k]) {
                bool tie = (k > 0 && a.lps[r * a.K + k - 1] - a.lps[r * a.K + k] <= tol) ||
                           (k + 1 < a.K && a.lps[r * a.K + k] - a.lps[r * a.K + k + 1] <= tol);
                EXPECT_TRUE(tie) << "row " << r << " rank " << k;
            }
        }
    }
}

TEST(DistillCli, WritesTheDirectoryOnOneAndTwoRanks) {
    if (!have_model()) GTEST_SKIP() << "default model not present";
    std::string prompts = write_prompts("cli.jsonl", PROMPTS), dir = tmp("cli1");
    rm_rf(dir);
    std::string args = "distill --teacher " + model() + " --prompts " + prompts +
                       " --top-k 5 --max-tokens 6 --ctx-size 128 --json";
    Result one = run(args + " --out " + dir);
    ASSERT_EQ(one.code, 0) << one.err;
    EXPECT_NE(one.out.find("\"samples\":3,"), std::string::npos) << one.out;
    EXPECT_NE(one.out.find("\"top_k\":5,"), std::string::npos) << one.out;
    // compact progress when stderr is not a terminal
    EXPECT_NE(one.err.find("cparallel: distill 3/3 prompts"), std::string::npos) << one.err;
    Data d1;
    load(dir, &d1);
    if (HasFatalFailure()) return;
    EXPECT_EQ(d1.samples.size(), 3u);
    EXPECT_EQ(d1.K, 5);
    check_rows(d1, (int)json_integer_value(json_object_get(d1.meta, "vocab_size")));
    // an occupied directory is refused
    Result again = run(args + " --out " + dir);
    EXPECT_EQ(again.code, 1);
    EXPECT_NE(again.err.find("is not empty"), std::string::npos) << again.err;
    EXPECT_EQ(count_lines(again.err), 1) << again.err;
    if (system("command -v mpirun >/dev/null 2>&1") != 0) GTEST_SKIP() << "mpirun not installed";
    // two pipeline stages replace it (--force) with what one rank wrote
    Result two = run_mpi(2, args + " --pp 2 --no-progress --force --out " + dir);
    ASSERT_EQ(two.code, 0) << two.err;
    EXPECT_EQ(two.err, "") << "only rank 0 reports";
    Data d2;
    load(dir, &d2);
    if (HasFatalFailure()) return;
    ASSERT_EQ(d2.samples.size(), d1.samples.size());
    for (size_t i = 0; i < d1.samples.size(); i++) {
        EXPECT_EQ(d2.samples[i].prompt, d1.samples[i].prompt);
        EXPECT_EQ(d2.samples[i].gen, d1.samples[i].gen);
        EXPECT_EQ(d2.samples[i].row_begin, d1.samples[i].row_begin);
    }
    expect_same_rows(d1, d2, 1e-4);
    rm_rf(dir);
    unlink(prompts.c_str());
}

// Three tensor-parallel ranks write what one rank writes: each rank passes
// its K best and its slice's log-sum-exp terms and the target's logit, not
// its slice of the vocabulary. On weights converted to f32 the only change
// is the summation order of the row-parallel sums (a few 1e-7 relative).
TEST(DistillCli, TensorParallelTeacherMatchesOneRank) {
    if (!have_model()) GTEST_SKIP() << "default model not present";
    if (system("command -v mpirun >/dev/null 2>&1") != 0) GTEST_SKIP() << "mpirun not installed";
    std::string prompts = write_prompts("clitp.jsonl", PROMPTS), d1 = tmp("clitp1"), d3 = tmp("clitp3");
    rm_rf(d1);
    rm_rf(d3);
    std::string args = "distill --teacher " + model() + " --prompts " + prompts +
                       " --top-k 8 --max-tokens 6 --ctx-size 128 --convert f32 --no-progress --threads 1";
    Result one = run(args + " --out " + d1);
    ASSERT_EQ(one.code, 0) << one.err;
    Result three = run_mpi(3, args + " --tp 3 --out " + d3);
    ASSERT_EQ(three.code, 0) << three.err;
    Data a, b;
    load(d1, &a);
    load(d3, &b);
    if (HasFatalFailure()) return;
    ASSERT_EQ(b.samples.size(), a.samples.size());
    for (size_t i = 0; i < a.samples.size(); i++) EXPECT_EQ(b.samples[i].gen, a.samples[i].gen) << "sample " << i;
    expect_same_rows(a, b, 1e-4);
    rm_rf(d1);
    rm_rf(d3);
    unlink(prompts.c_str());
}

TEST(DistillCli, BadInputIsOneClearLine) {
    std::string bad = write_prompts("clibad.jsonl", "{\"prompt\": \"a\"}\n{\"prompt\": \"b\",}\n");
    std::string dir = tmp("clibad");
    rm_rf(dir);
    Result r = run("distill --teacher " + model() + " --prompts " + bad + " --out " + dir);
    EXPECT_EQ(r.code, 1);
    EXPECT_NE(r.err.find(bad + ":2: not valid JSON"), std::string::npos) << r.err;
    EXPECT_EQ(count_lines(r.err), 1) << r.err;
    EXPECT_FALSE(exists(dir)) << "nothing is written for a bad prompts file";
    struct {
        const char *args, *expect;
    } cases[] = {
        {"distill --prompts p --out o", "--teacher, --prompts and --out are required"},
        {"distill --teacher m --prompts p --out o --top-k 0", "invalid value '0' for --top-k"},
        {"distill --teacher m --prompts p --out o --top-k 257", "invalid value '257' for --top-k"},
        {"distill --teacher m --prompts p --out o --chat --no-chat", "--chat or --no-chat"},
        {"distill --teacher m --prompts p --out o --sp", "--sp needs --tp 2"},
        {"distill --teacher m --prompts p --out o --top-p 2", "invalid value '2' for --top-p"},
    };
    for (auto &c : cases) {
        Result u = run(c.args);
        EXPECT_EQ(u.code, 2) << c.args << "\n" << u.err;
        EXPECT_NE(u.err.find(c.expect), std::string::npos) << c.args << "\n" << u.err;
        EXPECT_EQ(count_lines(u.err), 1) << u.err;
    }
    Result h = run("distill --help");
    EXPECT_EQ(h.code, 0);
    EXPECT_NE(h.out.find("--completion-only"), std::string::npos);
    if (have_model() && system("command -v mpirun >/dev/null 2>&1") == 0) {
        // every rank finds the same fault; one line says it and no rank hangs
        Result m = run_mpi(2, "distill --teacher " + model() + " --prompts " + bad + " --out " +
                                  dir + " --pp 2");
        EXPECT_EQ(m.code, 1) << m.err;
        EXPECT_NE(m.err.find(bad + ":2: not valid JSON"), std::string::npos) << m.err;
        // (mpirun adds its own lines about the exit code)
        size_t ours = 0;
        for (size_t at = 0; (at = m.err.find("cparallel: ", at)) != std::string::npos; at++)
            ours++;
        EXPECT_EQ(ours, 1u) << m.err;
    }
    unlink(bad.c_str());
}

} // namespace
