// Logits of a GGUF model, bare and with each of several LoRA adapters, for the interop tests.
//
//   adapterops_llama_driver MODEL.gguf OUT.f32 TOKENS [LORA.gguf ...]
//
// TOKENS is a comma-separated list of token ids. OUT receives float32 logits, row-major
// [1 + n_loras, n_tokens, n_vocab]: first the bare model, then the model with each adapter
// applied alone at scale 1. The exit status is non-zero, with a line on stderr, on any failure.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static int fail(const std::string & message) {
    std::fprintf(stderr, "adapterops_llama_driver: %s\n", message.c_str());
    return 1;
}

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

static bool no_progress(float, void *) {
    return true;
}

static std::vector<llama_token> parse_tokens(const char * text) {
    std::vector<llama_token> tokens;
    for (const char * p = text; *p;) {
        char * end = nullptr;
        tokens.push_back((llama_token) std::strtol(p, &end, 10));
        if (end == p) {
            return {};
        }
        p = *end == ',' ? end + 1 : end;
    }
    return tokens;
}

// Runs the whole sequence in one batch and appends every position's logits to `out`.
static bool run(llama_context * ctx, const std::vector<llama_token> & tokens, int n_vocab, std::vector<float> & out) {
    llama_memory_clear(llama_get_memory(ctx), true);
    llama_batch batch = llama_batch_init((int32_t) tokens.size(), 0, 1);
    for (size_t i = 0; i < tokens.size(); i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = (int32_t) tokens.size();
    const bool ok = llama_decode(ctx, batch) == 0;
    if (ok) {
        for (size_t i = 0; i < tokens.size(); i++) {
            const float * logits = llama_get_logits_ith(ctx, (int32_t) i);
            out.insert(out.end(), logits, logits + n_vocab);
        }
    }
    llama_batch_free(batch);
    return ok;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        return fail("usage: adapterops_llama_driver MODEL.gguf OUT.f32 TOKENS [LORA.gguf ...]");
    }
    const std::vector<llama_token> tokens = parse_tokens(argv[3]);
    if (tokens.empty()) {
        return fail(std::string("cannot parse token ids: ") + argv[3]);
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = 0;
    mparams.progress_callback = no_progress;
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) {
        return fail(std::string("cannot load model ") + argv[1]);
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = (uint32_t) tokens.size() + 8;
    cparams.n_batch = (uint32_t) tokens.size();
    cparams.n_ubatch = (uint32_t) tokens.size();
    cparams.n_threads = 1;
    cparams.n_threads_batch = 1;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        return fail("cannot create a context");
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    std::vector<float> out;
    if (!run(ctx, tokens, n_vocab, out)) {
        return fail("decode failed (bare model)");
    }
    for (int i = 4; i < argc; i++) {
        llama_adapter_lora * lora = llama_adapter_lora_init(model, argv[i]);
        if (!lora) {
            return fail(std::string("llama.cpp refused the adapter ") + argv[i]);
        }
        float scale = 1.0f;
        if (llama_set_adapters_lora(ctx, &lora, 1, &scale) != 0) {
            return fail(std::string("cannot apply the adapter ") + argv[i]);
        }
        if (!run(ctx, tokens, n_vocab, out)) {
            return fail(std::string("decode failed with ") + argv[i]);
        }
        llama_set_adapters_lora(ctx, nullptr, 0, nullptr);
        llama_adapter_lora_free(lora);
    }

    FILE * f = std::fopen(argv[2], "wb");
    if (!f || std::fwrite(out.data(), sizeof(float), out.size(), f) != out.size() || std::fclose(f) != 0) {
        return fail(std::string("cannot write ") + argv[2]);
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
