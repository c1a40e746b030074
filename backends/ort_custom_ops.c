/* ONNX Runtime custom ops that run graphopt's cpu_integer kernels, so an ONNX user gets the same fused
 * integer kernels as the ``cpu_integer`` backend (same source: cpu_integer_kernels.c is included here).
 *
 * Domain ai.graphopt.cpu_integer; one op per fused cpu.* op and output type (ONNX Runtime infers a custom
 * op's output type from its registration, so the type is part of the name):
 *   IntGemm_{u8,i8,i32}       x, w [N, Kp] (unpacked int8; packed once, at the first run), bias, m?, c?,
 *                             table?, res?, mb?, m2?, c2?, ks? (the requant's shift per column)
 *   IntBmm_{u8,i8,i32}        a, b, bias, m?, c?, pow2?, mask?, sizes?, table?, mb?, m2?, c2?; optional
 *                             a_perm, b_perm, out_perm: transposed operands read, the output written, in place
 *   IntLayerNorm_{u8,i8,i32}  x, m?, c?
 *   IntShiftmax_u8            x, pow2, mask?, sizes?, table?
 *   IntRequant_{u8,i8,i32}    x, m, c
 *   IntAdd_{u8,i8,i32}        a, b, ma, mb, c
 *   IntTokenMerge_i32         x, keys, sizes -> x', sizes'        (cpu_integer_tokens.c; keys summed per head)
 *   IntQuantize_{u8,i8,i32}   x (float)                           (cpu_integer_edges.c; patch: a ViT's patches)
 *   IntDequantize_f32         x, scale, offset?                   (cpu_integer_edges.c)
 * Each calls the kernel exactly as backends/cpu_integer_ops.py does (same epilogue record, same
 * operand layout), so outputs are bit-identical to the cpu_integer backend and the reference ops.
 * The float edges round after the multiply and again after the add: ort_custom_ops.py builds this file with
 * -ffp-contract=off, as cpu_integer_edges.py builds cpu_integer_edges.c (the rest has no floating point).
 *
 * ONNX Runtime's C ABI, declared here rather than included: the pip wheel ships no C headers. The ABI
 * is stable and append-only: OrtApiBase, the OrtApi table of function pointers (a slot never moves once
 * released) and the versioned OrtCustomOp struct. Only the slots this file calls are named, at their
 * indices in ORT's public include/onnxruntime/core/session/onnxruntime_c_api.h; the rest is padding.
 * Target: ORT_API_VERSION 16 (ONNX Runtime >= 1.16, where OrtCustomOp gained CreateKernelV2 and
 * KernelComputeV2, which report errors as statuses). RegisterCustomOps refuses an older runtime with
 * its version string.
 */
#define _GNU_SOURCE                     /* sched_getaffinity: the default thread count */
#include "cpu_integer_kernels.c"
#include "cpu_integer_tokens.c"
/* cpu_integer_edges.c declares the kernels' OUT_* codes (same values) again: renamed while it is included */
#define OUT_U8 EDGES_OUT_U8
#define OUT_I8 EDGES_OUT_I8
#define OUT_I32 EDGES_OUT_I32
#include "cpu_integer_edges.c"
#undef OUT_U8
#undef OUT_I8
#undef OUT_I32

#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

/* Built with -fvisibility=hidden (ort_custom_ops.py): only what is marked EXPORT is visible, so this copy of the
 * kernels never interposes on (or is interposed by) the cpu_integer library loaded in the same process. */
#define EXPORT __attribute__((visibility("default")))

/* ---- the ONNX Runtime C ABI (the parts used) ---------------------------------------------------------- */
#define GO_ORT_API_VERSION 16

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
struct OrtCustomOp;

enum { ORT_INVALID_ARGUMENT = 2, ORT_FAIL = 1 };                      /* OrtErrorCode */
/* ONNXTensorElementDataType */
enum { T_UNDEFINED = 0, T_FLOAT = 1, T_UINT8 = 2, T_INT8 = 3, T_INT32 = 6, T_BOOL = 9 };
enum { INPUT_OUTPUT_REQUIRED = 0, INPUT_OUTPUT_OPTIONAL = 1 };        /* OrtCustomOpInputOutputCharacteristic */

typedef struct OrtApi {
    OrtStatus *(*CreateStatus)(int code, const char *msg);                                             /* 0 */
    void *pad1_[25];
    OrtStatus *(*CreateCustomOpDomain)(const char *domain, OrtCustomOpDomain **out);                  /* 26 */
    OrtStatus *(*CustomOpDomain_Add)(OrtCustomOpDomain *domain, const struct OrtCustomOp *op);         /* 27 */
    OrtStatus *(*AddCustomOpDomain)(OrtSessionOptions *options, OrtCustomOpDomain *domain);           /* 28 */
    void *pad2_[22];
    OrtStatus *(*GetTensorMutableData)(OrtValue *value, void **out);                                   /* 51 */
    void *pad3_[8];
    OrtStatus *(*GetTensorElementType)(const OrtTensorTypeAndShapeInfo *info, int *out);              /* 60 */
    OrtStatus *(*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);             /* 61 */
    OrtStatus *(*GetDimensions)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t n);     /* 62 */
    void *pad4_[2];
    OrtStatus *(*GetTensorTypeAndShape)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);      /* 65 */
    void *pad5_[19];
    OrtStatus *(*KernelInfoGetAttribute_float)(const OrtKernelInfo *info, const char *name, float *out);  /* 85 */
    OrtStatus *(*KernelInfoGetAttribute_int64)(const OrtKernelInfo *info, const char *name, int64_t *out); /* 86 */
    OrtStatus *(*KernelInfoGetAttribute_string)(const OrtKernelInfo *info, const char *name, char *out,
                                                size_t *size);                                          /* 87 */
    OrtStatus *(*KernelContext_GetInputCount)(const OrtKernelContext *ctx, size_t *out);               /* 88 */
    void *pad6_[1];
    OrtStatus *(*KernelContext_GetInput)(const OrtKernelContext *ctx, size_t index, const OrtValue **out); /* 90 */
    OrtStatus *(*KernelContext_GetOutput)(OrtKernelContext *ctx, size_t index, const int64_t *dims, size_t n,
                                          OrtValue **out);                                             /* 91 */
    void *pad7_[1];
    void (*ReleaseStatus)(OrtStatus *status);                                                          /* 93 */
    void *pad8_[5];
    void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *info);                           /* 99 */
    void *pad9_[63];
    OrtStatus *(*KernelInfoGetAttributeArray_int64)(const OrtKernelInfo *info, const char *name, int64_t *out,
                                                    size_t *size);                                     /* 163 */
    void *pad10_[80];
    OrtStatus *(*KernelInfo_GetNodeName)(const OrtKernelInfo *info, char *out, size_t *size);        /* 244, 1.15 */
} OrtApi;

#define SLOT(name, index) _Static_assert(offsetof(OrtApi, name) == (index) * sizeof(void *), #name " slot")
SLOT(CreateCustomOpDomain, 26); SLOT(AddCustomOpDomain, 28); SLOT(GetTensorMutableData, 51);
SLOT(GetTensorElementType, 60); SLOT(GetDimensions, 62); SLOT(GetTensorTypeAndShape, 65);
SLOT(KernelInfoGetAttribute_float, 85); SLOT(KernelInfoGetAttribute_int64, 86);
SLOT(KernelContext_GetInputCount, 88); SLOT(KernelContext_GetInput, 90);
SLOT(KernelContext_GetOutput, 91); SLOT(ReleaseStatus, 93); SLOT(ReleaseTensorTypeAndShapeInfo, 99);
SLOT(KernelInfoGetAttributeArray_int64, 163); SLOT(KernelInfo_GetNodeName, 244);

typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

typedef struct OrtCustomOp {            /* fields up to ReleaseAliasMap; ORT reads those of `version` only */
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(*GetName)(const struct OrtCustomOp *op);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op);
    int (*GetInputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *op);
    int (*GetOutputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *ctx);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                 void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *ctx);
    void *InferOutputShapeFn, *GetStartVersion, *GetEndVersion, *GetMayInplace, *ReleaseMayInplace, *GetAliasMap,
        *ReleaseAliasMap;
} OrtCustomOp;

/* ---- the ops ------------------------------------------------------------------------------------------ */
enum { OP_GEMM, OP_BMM, OP_LAYERNORM, OP_SHIFTMAX, OP_REQUANT, OP_ADD, OP_TOKEN_MERGE, OP_QUANTIZE, OP_DEQUANTIZE,
       N_OPS };
enum { OUT_F32 = 3, N_OUTS };           /* the kernels' OUT_U8, OUT_I8, OUT_I32, and float32 */
#define INTS ((1 << OUT_U8) | (1 << OUT_I8) | (1 << OUT_I32))

typedef struct {
    const char *name;
    int inputs, required, outputs;
    int out_types;                      /* bit t: a variant with output type t */
    int kind;                           /* reads the string attribute `kind` (an epilogue) */
    const char *attrs[24];              /* int attributes the op reads (NULL-terminated) */
    const char *optional[8];            /* those of them a node may lack (read as 0): added after files were written */
} op_spec_t;

static const op_spec_t SPECS[N_OPS] = {
    [OP_GEMM] = {"IntGemm", 12, 3, 1, INTS, 1, {"n", "k_padded", "flip", "pb", "pre", "k", "lo", "hi", "zp", "pre2",
                                                "k2", "lo2", "hi2", "zp2", "gelu_x", "gelu_n", "gelu_bits",
                                                "gelu_in_bits", "threads"},
                 {"gelu_x", "gelu_n", "gelu_bits", "gelu_in_bits"}},
    [OP_BMM] = {"IntBmm", 13, 3, 1, INTS, 1, {"a_zp", "flip_a", "flip_b", "X", "n_pow", "bits", "pre", "k", "lo", "hi",
                                              "zp", "pb", "pre2", "k2", "lo2", "hi2", "zp2", "threads"}},
    [OP_LAYERNORM] = {"IntLayerNorm", 4, 1, 1, INTS, 1, {"sh", "F", "iters", "pre", "k", "lo", "hi", "zp", "threads"}},
    [OP_SHIFTMAX] = {"IntShiftmax", 5, 2, 1, 1 << OUT_U8, 0, {"X", "n_pow", "bits", "threads"}},
    [OP_REQUANT] = {"IntRequant", 4, 3, 1, INTS, 1, {"pre", "k", "lo", "hi", "zp", "threads"}},
    [OP_ADD] = {"IntAdd", 6, 5, 1, INTS, 1, {"pb", "pre", "k", "lo", "hi", "zp", "threads"}},
    [OP_TOKEN_MERGE] = {"IntTokenMerge", 3, 3, 2, 1 << OUT_I32, 0, {"r", "protected", "shift", "heads_axis", "threads"},
                        {"heads_axis"}},
    [OP_QUANTIZE] = {"IntQuantize", 1, 1, 1, INTS, 0, {"zero_point", "lo", "hi", "threads"}},   /* inv_scale, patch */
    [OP_DEQUANTIZE] = {"IntDequantize", 3, 2, 1, 1 << OUT_F32, 0, {"zero_point", "threads"}},
};

static const char *const KINDS[] = {[EPI_RAW] = "raw", [EPI_REQUANT] = "requant", [EPI_TABLE] = "table",
                                    [EPI_ADD] = "add", [EPI_TABLE_REQUANT] = "table_requant",
                                    [EPI_ADD_REQUANT] = "add_requant", [EPI_REQUANT2] = "requant_requant"};
static const char *const OUT_NAMES[] = {[OUT_U8] = "u8", [OUT_I8] = "i8", [OUT_I32] = "i32", [OUT_F32] = "f32"};
static const int OUT_ONNX[] = {[OUT_U8] = T_UINT8, [OUT_I8] = T_INT8, [OUT_I32] = T_INT32, [OUT_F32] = T_FLOAT};

typedef struct {
    OrtCustomOp base;                   /* first: ORT hands back &base */
    int op, out_type;
    char name[32];
} custom_op_t;

typedef struct {
    const OrtApi *api;
    int op, out_type, kind;
    int64_t attr[24];
    float inv_scale;                    /* IntQuantize */
    char node[128];                     /* the node's name, for errors ("" if none or longer) */
    pthread_mutex_t lock;
    int8_t *packed;                     /* IntGemm: w packed for the kernels, and the w it was packed from */
    const void *packed_from;
    int64_t perm[3][4];                 /* IntBmm: a_perm, b_perm, out_perm (identity when the node has none) */
    int64_t patch[5];                   /* IntQuantize: (ph, pw, C, H, W) when it writes patches, else all 0 */
} kernel_t;

static int default_threads;            /* go_ort_set_threads; 0: the CPUs this process may run on */

/* The thread count for kernels whose node says 0 (opt-cli writes 0 unless --threads is given). */
EXPORT void go_ort_set_threads(int threads) { default_threads = threads; }

EXPORT int go_ort_api_version(void) { return GO_ORT_API_VERSION; }

/* At most this GEMM instruction set in every session (2: AMX, 1: VNNI, 0: portable C), as
 * cpu_integer_library.limit_isa for the cpu_integer backend's copy of the kernels. */
EXPORT void go_ort_limit_isa(int level) { go_limit_isa(level); }

static int64_t attr(const kernel_t *kn, const char *name) {
    const char *const *names = SPECS[kn->op].attrs;
    for (int i = 0; names[i]; i++)
        if (!strcmp(names[i], name)) return kn->attr[i];
    abort();                            /* a name not in SPECS: a bug in this file */
}

static int threads_of(const kernel_t *kn) {
    int t = (int)attr(kn, "threads");
    if (t > 0) return t;
    if (default_threads > 0) return default_threads;
    cpu_set_t cpus;
    return sched_getaffinity(0, sizeof cpus, &cpus) == 0 && CPU_COUNT(&cpus) > 0 ? CPU_COUNT(&cpus) : 1;
}

static OrtStatus *fail(const OrtApi *api, const kernel_t *kn, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static OrtStatus *fail(const OrtApi *api, const kernel_t *kn, const char *fmt, ...) {
    char msg[512];
    int n = snprintf(msg, sizeof msg, "graphopt %s%s%s%s_%s: ", kn->node[0] ? "node '" : "", kn->node,
                     kn->node[0] ? "' " : "", SPECS[kn->op].name, OUT_NAMES[kn->out_type]);
    va_list args;
    va_start(args, fmt);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, args);
    va_end(args);
    return api->CreateStatus(ORT_INVALID_ARGUMENT, msg);
}

#define TRY(call) do { OrtStatus *status_ = (call); if (status_) return status_; } while (0)

/* IntBmm's optional a_perm, b_perm, out_perm: the operand is transpose(input, perm) (read in place with strides;
 * a keeps its last axis last), and the output is written as transpose(result, out_perm) (last axis last). */
static OrtStatus *read_perms(const OrtApi *api, const OrtKernelInfo *info, kernel_t *kn) {
    static const char *const names[3] = {"a_perm", "b_perm", "out_perm"};
    for (int p = 0; p < 3; p++) {
        int64_t *perm = kn->perm[p], seen = 0;
        size_t size = 0;
        for (int d = 0; d < 4; d++) perm[d] = d;
        OrtStatus *s = api->KernelInfoGetAttributeArray_int64(info, names[p], NULL, &size);
        if (s) {                        /* absent: the identity */
            api->ReleaseStatus(s);
            continue;
        }
        if (size == 4 && (s = api->KernelInfoGetAttributeArray_int64(info, names[p], perm, &size))) {
            api->ReleaseStatus(s);
            size = 0;
        }
        for (int d = 0; d < 4; d++) seen |= perm[d] >= 0 && perm[d] < 4 ? 1 << perm[d] : 0;
        if (size != 4 || seen != 15 || (p != 1 && perm[3] != 3))
            return fail(api, kn, "%s must permute 4 axes%s", names[p], p != 1 ? ", the last one kept last" : "");
    }
    return NULL;
}

static int identity(const int64_t *perm) { return perm[0] == 0 && perm[1] == 1 && perm[2] == 2 && perm[3] == 3; }

/* The strides (elements) of transpose(t, perm) for a contiguous t of these dims, and its dims. */
static void permuted(const int64_t *dims, const int64_t *perm, int64_t *pdims, int64_t *pstrides) {
    int64_t strides[4], was[4], s = 1;
    for (int d = 3; d >= 0; d--) {
        strides[d] = s;
        was[d] = dims[d];
        s *= dims[d];
    }
    for (int d = 0; d < 4; d++) {                      /* pdims may be dims */
        pdims[d] = was[perm[d]];
        pstrides[d] = strides[perm[d]];
    }
}

static OrtStatus *create_kernel(const OrtCustomOp *base, const OrtApi *api, const OrtKernelInfo *info, void **out) {
    const custom_op_t *op = (const custom_op_t *)base;
    kernel_t *kn = calloc(1, sizeof *kn);
    if (!kn) return api->CreateStatus(ORT_FAIL, "graphopt custom op: out of memory");
    kn->api = api;
    kn->op = op->op;
    kn->out_type = op->out_type;
    kn->kind = EPI_RAW;
    pthread_mutex_init(&kn->lock, NULL);
    *out = kn;                          /* ORT destroys it even when this fails */
    size_t node_size = sizeof kn->node;
    OrtStatus *named = api->KernelInfo_GetNodeName(info, kn->node, &node_size);
    if (named) {                        /* a name longer than the buffer: errors go without it */
        api->ReleaseStatus(named);
        kn->node[0] = 0;
    }
    const char *const *names = SPECS[op->op].attrs;
    for (int i = 0; names[i]; i++) {
        OrtStatus *s = api->KernelInfoGetAttribute_int64(info, names[i], &kn->attr[i]);
        if (s) {
            api->ReleaseStatus(s);
            int optional = 0;
            for (int o = 0; SPECS[op->op].optional[o]; o++) optional |= !strcmp(SPECS[op->op].optional[o], names[i]);
            kn->attr[i] = 0;
            if (optional) continue;
            return fail(api, kn, "the node has no int attribute '%s' (write it with graphopt's ONNX lowering of the "
                        "cpu.* ops)", names[i]);
        }
    }
    if (op->op == OP_QUANTIZE) {
        OrtStatus *s = api->KernelInfoGetAttribute_float(info, "inv_scale", &kn->inv_scale);
        if (s) {
            api->ReleaseStatus(s);
            return fail(api, kn, "the node has no float attribute 'inv_scale'");
        }
        size_t size = 0;
        if ((s = api->KernelInfoGetAttributeArray_int64(info, "patch", NULL, &size))) api->ReleaseStatus(s);
        else if (size != 5 || (s = api->KernelInfoGetAttributeArray_int64(info, "patch", kn->patch, &size)) ||
                 kn->patch[0] < 1 || kn->patch[1] < 1) {
            if (s) api->ReleaseStatus(s);
            return fail(api, kn, "patch must be 5 ints (ph, pw, C, H, W), ph and pw at least 1");
        }
    }
    if (op->op == OP_BMM) TRY(read_perms(api, info, kn));
    if (SPECS[op->op].kind) {
        char kind[32];
        size_t size = sizeof kind;
        OrtStatus *s = api->KernelInfoGetAttribute_string(info, "kind", kind, &size);
        if (s) {
            api->ReleaseStatus(s);
            return fail(api, kn, "the node has no string attribute 'kind' (or a longer one than any kind)");
        }
        int found = -1;
        for (int k = 0; k < (int)(sizeof KINDS / sizeof *KINDS); k++)
            if (!strcmp(kind, KINDS[k])) found = k;
        if (found < 0) return fail(api, kn, "unknown epilogue kind '%s'", kind);
        kn->kind = found;
    }
    return NULL;
}

static void destroy_kernel(void *p) {
    kernel_t *kn = p;
    if (!kn) return;
    pthread_mutex_destroy(&kn->lock);
    free(kn->packed);
    free(kn);
}

/* ---- operands ----------------------------------------------------------------------------------------- */
typedef struct {
    void *data;                         /* NULL: an absent optional input */
    int type;
    size_t rank;
    int64_t dims[8], numel;
} tensor_t;

static OrtStatus *input(const kernel_t *kn, OrtKernelContext *ctx, size_t count, size_t i, tensor_t *t) {
    const OrtApi *api = kn->api;
    memset(t, 0, sizeof *t);
    const OrtValue *v = NULL;
    if (i < count) TRY(api->KernelContext_GetInput(ctx, i, &v));
    if (!v) {
        if ((int)i < SPECS[kn->op].required) return fail(api, kn, "input %zu is missing", i);
        return NULL;
    }
    OrtTensorTypeAndShapeInfo *info;
    TRY(api->GetTensorTypeAndShape(v, &info));
    OrtStatus *s = api->GetTensorElementType(info, &t->type);
    if (!s) s = api->GetDimensionsCount(info, &t->rank);
    if (!s && t->rank > 8) s = fail(api, kn, "input %zu has rank %zu (at most 8)", i, t->rank);
    if (!s) s = api->GetDimensions(info, t->dims, t->rank);
    api->ReleaseTensorTypeAndShapeInfo(info);
    TRY(s);
    t->numel = 1;
    for (size_t d = 0; d < t->rank; d++) t->numel *= t->dims[d];
    return api->GetTensorMutableData((OrtValue *)v, &t->data);
}

static OrtStatus *output_at(const kernel_t *kn, OrtKernelContext *ctx, size_t index, const int64_t *dims, size_t rank,
                            void **data) {
    OrtValue *v;
    TRY(kn->api->KernelContext_GetOutput(ctx, index, dims, rank, &v));
    return kn->api->GetTensorMutableData(v, data);
}

static OrtStatus *output(const kernel_t *kn, OrtKernelContext *ctx, const int64_t *dims, size_t rank, void **data) {
    return output_at(kn, ctx, 0, dims, rank, data);
}

static const char *type_name(int type) {
    return type == T_UINT8 ? "uint8" : type == T_INT8 ? "int8" : type == T_INT32 ? "int32" : type == T_BOOL ? "bool"
           : type == T_FLOAT ? "float" : "another type";
}

/* An int32 vector of at least n values (a per-column constant, a table), or absent when allowed. */
static OrtStatus *vector(const kernel_t *kn, const tensor_t *t, const char *what, int64_t n, int needed) {
    if (!t->data) return needed ? fail(kn->api, kn, "%s is missing (epilogue kind '%s' needs it)", what,
                                       KINDS[kn->kind]) : NULL;
    if (t->type != T_INT32) return fail(kn->api, kn, "%s must be int32, got %s", what, type_name(t->type));
    if (t->numel < n) return fail(kn->api, kn, "%s has %lld values, needs %lld", what, (long long)t->numel,
                                  (long long)n);
    return NULL;
}

static int out_code(int type) { return type == T_UINT8 ? OUT_U8 : type == T_INT8 ? OUT_I8 : OUT_I32; }

/* The optional last input `live` (cpu_integer_rows.py): uint8, one per row of the kernel's output (the rows
 * computed; the others are written as 0). NULL when absent. */
static OrtStatus *live_input(const kernel_t *kn, const tensor_t *t, int64_t rows, const uint8_t **live) {
    *live = t->data;
    if (!t->data) return NULL;
    if (t->type != T_UINT8 || t->numel != rows)
        return fail(kn->api, kn, "live must be uint8 with one value per row (%lld), got %s with %lld values",
                    (long long)rows, type_name(t->type), (long long)t->numel);
    return NULL;
}

/* 8-bit activations as the u8 the kernels read (i8 v -> v + 128, as cpu_integer_ops._as_u8), rows of k values
 * zero-padded to kp; NULL when the input can be read as it is. Chunks of rows on the kernels' go_pool.h pool. */
typedef struct { const uint8_t *x; uint8_t *a; int64_t rows, k, kp, chunk; uint8_t x80; } u8_rows_job_t;

static void u8_rows_chunk(const void *p, int64_t c, void **scratch) {
    (void)scratch;
    const u8_rows_job_t *j = p;
    int64_t r1 = (c + 1) * j->chunk < j->rows ? (c + 1) * j->chunk : j->rows;
    for (int64_t r = c * j->chunk; r < r1; r++) {
        const uint8_t *src = j->x + r * j->k;
        uint8_t *dst = j->a + r * j->kp;
        for (int64_t i = 0; i < j->k; i++) dst[i] = src[i] ^ j->x80;
        memset(dst + j->k, 0, (size_t)(j->kp - j->k));
    }
}

static uint8_t *as_u8_rows(const void *x, int64_t rows, int64_t k, int64_t kp, int flip, int threads) {
    if (!flip && k == kp) return NULL;
    uint8_t *a = malloc((size_t)(rows * kp));
    if (!a) return NULL;
    int64_t chunk = pool_chunk(rows, threads, (1 << 16) / (kp < 1 ? 1 : kp));
    u8_rows_job_t j = {x, a, rows, k, kp, chunk, flip ? 0x80 : 0};
    pool_run(threads, (rows + chunk - 1) / chunk, u8_rows_chunk, NULL, &j);
    return a;
}

/* ---- IntGemm: cpu_integer_ops.int_gemm ---------------------------------------------------------------- */
static OrtStatus *packed_weights(kernel_t *kn, const tensor_t *w, int64_t n, int64_t kp, const int8_t **out) {
    /* w is an initializer (the lowering writes it as one): packed at the first run, again only if it moves */
    pthread_mutex_lock(&kn->lock);
    if (kn->packed_from != w->data) {
        int8_t *p = malloc((size_t)go_packed_size(n, kp));
        int32_t *colsum = malloc(sizeof(int32_t) * (size_t)n);
        if (p && colsum) go_pack_b(w->data, n, kp, p, colsum);
        free(colsum);
        if (!p || !colsum) {
            free(p);
            pthread_mutex_unlock(&kn->lock);
            return kn->api->CreateStatus(ORT_FAIL, "graphopt IntGemm: out of memory packing the weights");
        }
        free(kn->packed);
        kn->packed = p;
        kn->packed_from = w->data;
    }
    *out = kn->packed;
    pthread_mutex_unlock(&kn->lock);
    return NULL;
}

static OrtStatus *gemm(kernel_t *kn, OrtKernelContext *ctx, size_t count) {
    const OrtApi *api = kn->api;
    tensor_t in[12];
    for (size_t i = 0; i < 12; i++) TRY(input(kn, ctx, count, i, &in[i]));
    const tensor_t *x = &in[0], *w = &in[1];
    int64_t n = attr(kn, "n"), kp = attr(kn, "k_padded"), flip = attr(kn, "flip");
    int kind = kn->kind;
    if (x->type != (flip ? T_INT8 : T_UINT8) || x->rank < 1)
        return fail(api, kn, "x must be %s with at least one axis (flip=%lld), got %s of rank %zu",
                    flip ? "int8" : "uint8", (long long)flip, type_name(x->type), x->rank);
    int64_t k = x->dims[x->rank - 1], rows = k ? x->numel / k : 0;
    if (k > kp || kp % 4) return fail(api, kn, "x has %lld columns, k_padded is %lld", (long long)k, (long long)kp);
    if (w->type != T_INT8 || w->rank != 2 || w->dims[0] != n || w->dims[1] != kp)
        return fail(api, kn, "w must be int8 [%lld, %lld], got %s of rank %zu", (long long)n, (long long)kp,
                    type_name(w->type), w->rank);
    if (kind == EPI_ADD_REQUANT || kind == EPI_REQUANT2)
        return fail(api, kn, "epilogue kind '%s' is not one of a GEMM", KINDS[kind]);
    int requant = kind != EPI_RAW, table = kind == EPI_TABLE || kind == EPI_TABLE_REQUANT;
    TRY(vector(kn, &in[2], "bias", n, 1));
    TRY(vector(kn, &in[3], "m", n, requant));
    TRY(vector(kn, &in[4], "c", n, requant));
    TRY(vector(kn, &in[5], "table", attr(kn, "hi") - attr(kn, "lo") + 1, table));
    TRY(vector(kn, &in[6], "res", rows * n, kind == EPI_ADD));
    TRY(vector(kn, &in[7], "mb", n, kind == EPI_ADD));
    TRY(vector(kn, &in[8], "m2", n, kind == EPI_TABLE_REQUANT));
    TRY(vector(kn, &in[9], "c2", n, kind == EPI_TABLE_REQUANT));
    TRY(vector(kn, &in[10], "ks", n, 0));     /* sibling layers of different shifts: the requant's k per column */
    if (in[10].data && !requant) return fail(api, kn, "ks (a shift per column) belongs to a requant epilogue");
    const uint8_t *live;
    TRY(live_input(kn, &in[11], rows, &live));
    const int8_t *packed = NULL;
    TRY(packed_weights(kn, w, n, kp, &packed));
    int64_t dims[8];
    memcpy(dims, x->dims, sizeof dims);
    dims[x->rank - 1] = n;
    void *y;
    TRY(output(kn, ctx, dims, x->rank, &y));
    if (!rows) return NULL;
    epilogue_t e = {.kind = kind, .out_type = kn->out_type, .bias = in[2].data, .pre = (int32_t)attr(kn, "pre"),
                    .k = (int32_t)attr(kn, "k"), .lo = (int32_t)attr(kn, "lo"), .hi = (int32_t)attr(kn, "hi"),
                    .zp = (int32_t)attr(kn, "zp"), .m = in[3].data, .c = in[4].data, .table = in[5].data,
                    .res = in[6].data, .ldr = n, .pb = (int32_t)attr(kn, "pb"), .mb = in[7].data, .m2 = in[8].data,
                    .c2 = in[9].data, .ks = in[10].data, .pre2 = (int32_t)attr(kn, "pre2"), .k2 = (int32_t)attr(kn, "k2"),
                    .lo2 = (int32_t)attr(kn, "lo2"), .hi2 = (int32_t)attr(kn, "hi2"), .zp2 = (int32_t)attr(kn, "zp2"),
                    .gelu_x = (int32_t)attr(kn, "gelu_x"), .gelu_n = (int32_t)attr(kn, "gelu_n"),
                    .gelu_bits = (int32_t)attr(kn, "gelu_bits"), .gelu_in_bits = (int32_t)attr(kn, "gelu_in_bits")};
    int threads = threads_of(kn);
    uint8_t *a = as_u8_rows(x->data, rows, k, kp, (int)flip, threads);
    if (!a && (flip || k != kp)) return api->CreateStatus(ORT_FAIL, "graphopt IntGemm: out of memory");
    go_gemm(a ? a : x->data, kp, rows, kp, packed, n, &e, y, n, live, threads);
    free(a);
    return NULL;
}

/* ---- Shiftmax parameters (cpu_integer_library.softmax) ------------------------------------------------- */
/* t (elements of esize bytes) broadcast to [D0, D1, R, L] as the kernels read it: strides over (D0, D1, R) and
 * unit stride along L; a t with one value per row is materialized (*owned), as torch does. */
static OrtStatus *rows_of4(const kernel_t *kn, const tensor_t *t, const char *what, size_t esize, const int64_t *shape,
                           const void **data, int64_t stride[3], void **owned) {
    if (t->rank > 4) return fail(kn->api, kn, "%s has rank %zu (at most 4)", what, t->rank);
    int64_t td[4], st[4], s = 1;
    for (int d = 3; d >= 0; d--) {
        int src = d - (4 - (int)t->rank);
        td[d] = src >= 0 ? t->dims[src] : 1;
        if (td[d] != shape[d] && td[d] != 1)
            return fail(kn->api, kn, "the %s does not broadcast to the scores (axis %d: %lld vs %lld)", what, d,
                        (long long)td[d], (long long)shape[d]);
        st[d] = td[d] == shape[d] ? s : 0;
        s *= td[d];
    }
    const char *m = t->data;
    *owned = NULL;
    if (shape[3] > 1 && td[3] == 1) {   /* each row's one value over L columns */
        int64_t total = shape[0] * shape[1] * shape[2] * shape[3];
        char *full = malloc((size_t)total * esize + 1);
        if (!full) return kn->api->CreateStatus(ORT_FAIL, "graphopt: out of memory");
        for (int64_t i = 0; i < total; i++) {
            int64_t row = i / shape[3], i2 = row % shape[2], i1 = row / shape[2] % shape[1],
                    i0 = row / (shape[2] * shape[1]);
            memcpy(full + i * (int64_t)esize, m + (i0 * st[0] + i1 * st[1] + i2 * st[2]) * (int64_t)esize, esize);
        }
        *owned = full;
        m = full;
        st[0] = shape[1] * shape[2] * shape[3];
        st[1] = shape[2] * shape[3];
        st[2] = shape[3];
    }
    *data = m;
    memcpy(stride, st, sizeof(int64_t) * 3);
    return NULL;
}

/* The Shiftmax record for scores of the given shape: pow2, a bool mask, and proportional attention's int32 sizes
 * and table (logits + table[clamp(sizes)]); owned[0..1] are buffers the caller frees (also on an error). */
static OrtStatus *softmax_params(const kernel_t *kn, const tensor_t *pow2, const tensor_t *mask, const tensor_t *sizes,
                                 const tensor_t *table, const int64_t *shape, softmax_t *sm, void *owned[2]) {
    int64_t X = attr(kn, "X"), n = attr(kn, "n_pow");
    owned[0] = owned[1] = NULL;
    TRY(vector(kn, pow2, "pow2", n * X + 1, 1));
    *sm = (softmax_t){.pow2 = pow2->data, .X = (int32_t)X, .n = (int32_t)n, .bits = (int32_t)attr(kn, "bits")};
    int64_t st[3] = {0, 0, 0};
    const void *data = NULL;
    if (mask->data) {
        if (mask->type != T_BOOL && mask->type != T_UINT8)
            return fail(kn->api, kn, "mask must be bool, got %s", type_name(mask->type));
        TRY(rows_of4(kn, mask, "mask", 1, shape, &data, st, &owned[0]));
        sm->mask = data;
        sm->m0 = st[0], sm->m1 = st[1], sm->mr = st[2];
    }
    if (!sizes->data != !table->data) return fail(kn->api, kn, "sizes and table come together");
    if (sizes->data) {
        if (sizes->type != T_INT32) return fail(kn->api, kn, "sizes must be int32, got %s", type_name(sizes->type));
        if (table->rank != 1) return fail(kn->api, kn, "table must be 1-D, got rank %zu", table->rank);
        TRY(vector(kn, table, "table", 1, 1));
        TRY(rows_of4(kn, sizes, "sizes", sizeof(int32_t), shape, &data, st, &owned[1]));
        sm->sizes = data;
        sm->s0 = st[0], sm->s1 = st[1], sm->sr = st[2];
        sm->table = table->data;
        sm->tlen = (int32_t)table->numel;
    }
    return NULL;
}

/* ---- IntBmm: cpu_integer_ops.int_bmm ------------------------------------------------------------------ */
/* Kind add_requant (token_merge before integer_only): the size term joins the raw accumulator by int.add (m, mb,
 * c; pre, pb), then the m2, c2 requant, then Shiftmax: the kernels' softmax_t.logits record (EPI_ADD_REQUANT). */
static OrtStatus *bmm(kernel_t *kn, OrtKernelContext *ctx, size_t count) {
    const OrtApi *api = kn->api;
    tensor_t in[13];
    for (size_t i = 0; i < 13; i++) TRY(input(kn, ctx, count, i, &in[i]));
    const tensor_t *a = &in[0], *b = &in[1];
    int64_t flip_a = attr(kn, "flip_a"), flip_b = attr(kn, "flip_b");
    if (a->rank < 3 || a->rank > 4 || b->rank != a->rank)
        return fail(api, kn, "a and b must both be 3-D or 4-D, got ranks %zu and %zu", a->rank, b->rank);
    if (a->type != (flip_a ? T_INT8 : T_UINT8) || b->type != (flip_b ? T_UINT8 : T_INT8))
        return fail(api, kn, "a must be %s and b %s (flip_a=%lld, flip_b=%lld), got %s and %s",
                    flip_a ? "int8" : "uint8", flip_b ? "uint8" : "int8", (long long)flip_a, (long long)flip_b,
                    type_name(a->type), type_name(b->type));
    size_t r = a->rank;
    int perms = !identity(kn->perm[0]) || !identity(kn->perm[1]) || !identity(kn->perm[2]);
    if (perms && (r != 4 || flip_a))
        return fail(api, kn, "a_perm, b_perm and out_perm need 4-D operands and flip_a = 0");
    int64_t ad[4] = {1, 1, 1, 1}, as[4], bd[4] = {1, 1, 1, 1}, bs[4];      /* the operands as the kernel reads them */
    memcpy(ad + 4 - r, a->dims, sizeof(int64_t) * r);
    memcpy(bd + 4 - r, b->dims, sizeof(int64_t) * r);
    permuted(ad, kn->perm[0], ad, as);
    permuted(bd, kn->perm[1], bd, bs);
    int64_t B1 = ad[0], B2 = ad[1], M = ad[2], K = ad[3], N = bd[3];
    if (bd[2] != K || bd[0] != B1 || bd[1] != B2)
        return fail(api, kn, "b's batch dims or K (%lld) do not match a's", (long long)bd[2]);
    int softmax = in[5].data != NULL, add_rq = kn->kind == EPI_ADD_REQUANT, twice = kn->kind == EPI_REQUANT2;
    int requant = kn->kind == EPI_REQUANT || twice;
    if (kn->kind != EPI_RAW && !requant && !add_rq)
        return fail(api, kn, "epilogue kind '%s' is not one of a bmm", KINDS[kn->kind]);
    if (twice && softmax) return fail(api, kn, "kind requant_requant comes without Shiftmax (pow2)");
    if (softmax && kn->out_type != OUT_U8) return fail(api, kn, "with pow2 (Shiftmax) the output is u8");
    if (!softmax && (in[6].data || in[7].data || in[8].data))
        return fail(api, kn, "mask, sizes and table are Shiftmax inputs: pow2 is missing");
    if (add_rq && (!softmax || !in[7].data))
        return fail(api, kn, "kind add_requant needs Shiftmax (pow2) and the size term (sizes, table)");
    if (!add_rq && in[9].data) return fail(api, kn, "mb belongs to kind add_requant");
    if (!add_rq && !twice && (in[10].data || in[11].data))
        return fail(api, kn, "m2 and c2 belong to kinds add_requant and requant_requant");
    TRY(vector(kn, &in[2], "bias", N, 1));
    TRY(vector(kn, &in[3], "m", N, requant || add_rq));
    TRY(vector(kn, &in[4], "c", N, requant || add_rq));
    TRY(vector(kn, &in[9], "mb", N, add_rq));
    TRY(vector(kn, &in[10], "m2", twice ? B2 * N : N, add_rq || twice));    /* requant_requant: N per head */
    TRY(vector(kn, &in[11], "c2", twice ? B2 * N : N, add_rq || twice));
    const uint8_t *live;
    TRY(live_input(kn, &in[12], B1 * B2 * M, &live));
    /* the output is written as transpose(result, out_perm); live follows the output's rows */
    const int64_t *op = kn->perm[2];
    int64_t shape[4] = {B1, B2, M, N}, dims[4], step[4], os[4], ls[3];
    for (int d = 3, t = 1; d >= 0; d--) {
        dims[d] = shape[op[d]];
        step[d] = t;
        t *= dims[d];
    }
    for (int d = 0; d < 4; d++) os[op[d]] = step[d];
    for (int d = 0; d < 3; d++) ls[op[d]] = step[d] / N;
    softmax_t sm;
    void *owned[2] = {NULL, NULL};
    if (softmax && !identity(op)) return fail(api, kn, "out_perm comes without Shiftmax (pow2)");
    OrtStatus *s = softmax ? softmax_params(kn, &in[5], &in[6], &in[7], &in[8], shape, &sm, owned) : NULL;
    void *y;
    if (!s) s = output(kn, ctx, dims + 4 - r, r, &y);
    if (s || B1 * B2 * M * N == 0) {
        free(owned[0]);
        free(owned[1]);
        return s;
    }
    epilogue_t logits = {.kind = EPI_ADD_REQUANT, .out_type = OUT_I32, .pre = (int32_t)attr(kn, "pre"),
                         .k = (int32_t)attr(kn, "k"), .lo = (int32_t)attr(kn, "lo"), .hi = (int32_t)attr(kn, "hi"),
                         .zp = (int32_t)attr(kn, "zp"), .m = in[3].data, .c = in[4].data,
                         .pb = (int32_t)attr(kn, "pb"), .mb = in[9].data, .m2 = in[10].data, .c2 = in[11].data,
                         .pre2 = (int32_t)attr(kn, "pre2"), .k2 = (int32_t)attr(kn, "k2"),
                         .lo2 = (int32_t)attr(kn, "lo2"), .hi2 = (int32_t)attr(kn, "hi2"),
                         .zp2 = (int32_t)attr(kn, "zp2")};
    if (add_rq) sm.logits = &logits;
    /* add_requant: the bmm itself leaves the raw accumulator (+ bias), as cpu_integer_ops.int_bmm */
    epilogue_t e = {.kind = add_rq ? EPI_RAW : kn->kind, .out_type = softmax ? OUT_I32 : kn->out_type,
                    .bias = in[2].data, .pre = (int32_t)attr(kn, "pre"), .k = (int32_t)attr(kn, "k"),
                    .lo = (int32_t)attr(kn, "lo"), .hi = (int32_t)attr(kn, "hi"), .zp = (int32_t)attr(kn, "zp"),
                    .m = add_rq ? NULL : in[3].data, .c = add_rq ? NULL : in[4].data,
                    .m2 = twice ? in[10].data : NULL, .c2 = twice ? in[11].data : NULL,
                    .pre2 = (int32_t)attr(kn, "pre2"), .k2 = (int32_t)attr(kn, "k2"), .lo2 = (int32_t)attr(kn, "lo2"),
                    .hi2 = (int32_t)attr(kn, "hi2"), .zp2 = (int32_t)attr(kn, "zp2")};
    int threads = threads_of(kn);
    uint8_t *au = flip_a ? as_u8_rows(a->data, B1 * B2 * M, K, K, 1, threads) : NULL;
    if (!au && flip_a) {
        free(owned[0]);
        free(owned[1]);
        return api->CreateStatus(ORT_FAIL, "graphopt IntBmm: out of memory");
    }
    go_bmm(au ? au : a->data, as[0], as[1], as[2], b->data, bs[0], bs[1], bs[2], bs[3], (int32_t)flip_b, B1, B2, M, K,
           N, (int32_t)attr(kn, "a_zp"), &e, softmax ? &sm : NULL, y, live, ls[0], ls[1], ls[2], os[0], os[1], os[2],
           threads);
    free(au);
    free(owned[0]);
    free(owned[1]);
    return NULL;
}

/* ---- IntLayerNorm, IntShiftmax, IntRequant, IntAdd ------------------------------------------------------ */
static epilogue_t requant_epilogue(const kernel_t *kn, int kind, const void *m, const void *c) {
    return (epilogue_t){.kind = kind, .out_type = kn->out_type, .pre = (int32_t)attr(kn, "pre"),
                        .k = (int32_t)attr(kn, "k"), .lo = (int32_t)attr(kn, "lo"), .hi = (int32_t)attr(kn, "hi"),
                        .zp = (int32_t)attr(kn, "zp"), .m = m, .c = c};
}

static OrtStatus *rows_of(const kernel_t *kn, const tensor_t *x, int type, int64_t *rows, int64_t *cols) {
    if (type != T_UNDEFINED && x->type != type)
        return fail(kn->api, kn, "x must be %s, got %s", type_name(type), type_name(x->type));
    if (x->rank < 1) return fail(kn->api, kn, "x must have at least one axis");
    *cols = x->dims[x->rank - 1];
    *rows = *cols ? x->numel / *cols : 0;
    return NULL;
}

static OrtStatus *layernorm(kernel_t *kn, OrtKernelContext *ctx, size_t count) {
    tensor_t in[4];
    for (size_t i = 0; i < 4; i++) TRY(input(kn, ctx, count, i, &in[i]));
    int64_t rows = 0, C = 0;
    TRY(rows_of(kn, &in[0], T_INT32, &rows, &C));
    const uint8_t *live;
    TRY(live_input(kn, &in[3], rows, &live));
    int rq = kn->kind != EPI_RAW;
    if (rq && kn->kind != EPI_REQUANT) return fail(kn->api, kn, "epilogue kind '%s' is not one of a layernorm",
                                                   KINDS[kn->kind]);
    if (!rq && kn->out_type != OUT_I32) return fail(kn->api, kn, "without a requant the output is int32");
    TRY(vector(kn, &in[1], "m", C, rq));
    TRY(vector(kn, &in[2], "c", C, rq));
    void *y;
    TRY(output(kn, ctx, in[0].dims, in[0].rank, &y));
    epilogue_t e = requant_epilogue(kn, EPI_REQUANT, in[1].data, in[2].data);
    if (rows) go_layernorm(in[0].data, rows, C, (int32_t)attr(kn, "sh"), (int32_t)attr(kn, "F"),
                           (int32_t)attr(kn, "iters"), rq ? &e : NULL, y, live, threads_of(kn));
    return NULL;
}

static OrtStatus *shiftmax(kernel_t *kn, OrtKernelContext *ctx, size_t count) {
    tensor_t in[5];
    for (size_t i = 0; i < 5; i++) TRY(input(kn, ctx, count, i, &in[i]));
    const tensor_t *x = &in[0];
    if (x->type != T_INT32 || x->rank < 1 || x->rank > 4)
        return fail(kn->api, kn, "x must be int32 of rank 1 to 4, got %s of rank %zu", type_name(x->type), x->rank);
    int64_t shape[4];
    for (int d = 0; d < 4; d++) shape[d] = d < 4 - (int)x->rank ? 1 : x->dims[d - (4 - (int)x->rank)];
    softmax_t sm;
    void *owned[2];
    OrtStatus *s = softmax_params(kn, &in[1], &in[2], &in[3], &in[4], shape, &sm, owned);
    void *y;
    if (!s) s = output(kn, ctx, x->dims, x->rank, &y);
    if (!s && x->numel) go_shiftmax(x->data, shape[0], shape[1], shape[2], shape[3], &sm, y, threads_of(kn));
    free(owned[0]);
    free(owned[1]);
    return s;
}

static OrtStatus *requant(kernel_t *kn, OrtKernelContext *ctx, size_t count) {
    tensor_t in[4];
    for (size_t i = 0; i < 4; i++) TRY(input(kn, ctx, count, i, &in[i]));
    const tensor_t *x = &in[0];
    if (x->type != T_UINT8 && x->type != T_INT8 && x->type != T_INT32)
        return fail(kn->api, kn, "x must be uint8, int8 or int32, got %s", type_name(x->type));
    int64_t rows = 0, C = 0;
    TRY(rows_of(kn, x, T_UNDEFINED, &rows, &C));
    TRY(vector(kn, &in[1], "m", C, 1));
    TRY(vector(kn, &in[2], "c", C, 1));
    const uint8_t *live;
    TRY(live_input(kn, &in[3], rows, &live));
    void *y;
    TRY(output(kn, ctx, x->dims, x->rank, &y));
    epilogue_t e = requant_epilogue(kn, EPI_REQUANT, in[1].data, in[2].data);
    if (rows) go_requant(x->data, out_code(x->type), rows, C, &e, y, live, threads_of(kn));
    return NULL;
}

/* b broadcast to a's shape (numpy rules). *period = b's element count when b is a's trailing block repeated
 * (b's dims equal a's last ones, any leading 1s dropped: a position embedding [1, T, C] for [B, T, C]), read in
 * place; else *out holds b materialized row by row (NULL when b already has a's shape). */
static OrtStatus *broadcast(const kernel_t *kn, const tensor_t *a, const tensor_t *b, int32_t **out, int64_t *period) {
    *out = NULL;
    *period = a->numel;
    if (b->rank > a->rank) return fail(kn->api, kn, "b has more axes than a");
    int64_t stride[8], s = 1;
    for (int d = (int)a->rank - 1; d >= 0; d--) {
        int src = d - (int)(a->rank - b->rank);
        int64_t bd = src >= 0 ? b->dims[src] : 1;
        if (bd != a->dims[d] && bd != 1)
            return fail(kn->api, kn, "b does not broadcast to a (axis %d: %lld vs %lld)", d, (long long)bd,
                        (long long)a->dims[d]);
        stride[d] = bd == 1 ? 0 : s;
        s *= bd;
    }
    int block = a->rank && (stride[a->rank - 1] || a->dims[a->rank - 1] == 1), real = 0;
    for (size_t d = 0; d < a->rank; d++)            /* no axis b repeats after one of its own */
        if (a->dims[d] != 1) {
            if (stride[d]) real = 1;
            else if (real) block = 0;
        }
    if (block && b->numel) {                        /* b's rows repeat: go_add reads them in place */
        *period = b->numel;
        return NULL;
    }
    int32_t *full = malloc(sizeof(int32_t) * (size_t)(a->numel ? a->numel : 1));
    if (!full) return kn->api->CreateStatus(ORT_FAIL, "graphopt: out of memory");
    int64_t C = a->rank ? a->dims[a->rank - 1] : 1, cs = a->rank ? stride[a->rank - 1] : 0;
    for (int64_t r = 0; C && r < a->numel / C; r++) {       /* one offset per row, then the row (or its one value) */
        int64_t rem = r, off = 0;
        for (int d = (int)a->rank - 2; d >= 0; d--) {
            off += rem % a->dims[d] * stride[d];
            rem /= a->dims[d];
        }
        const int32_t *row = (const int32_t *)b->data + off;
        if (cs) memcpy(full + r * C, row, sizeof(int32_t) * (size_t)C);
        else for (int64_t c = 0; c < C; c++) full[r * C + c] = row[0];
    }
    *out = full;
    return NULL;
}

static OrtStatus *add(kernel_t *kn, OrtKernelContext *ctx, size_t count) {
    tensor_t in[6];
    for (size_t i = 0; i < 6; i++) TRY(input(kn, ctx, count, i, &in[i]));
    int64_t rows = 0, C = 0;
    TRY(rows_of(kn, &in[0], T_INT32, &rows, &C));
    const uint8_t *live;
    TRY(live_input(kn, &in[5], rows, &live));
    if (in[1].type != T_INT32) return fail(kn->api, kn, "b must be int32, got %s", type_name(in[1].type));
    TRY(vector(kn, &in[2], "ma", C, 1));
    TRY(vector(kn, &in[3], "mb", C, 1));
    TRY(vector(kn, &in[4], "c", C, 1));
    int32_t *b;
    int64_t period;
    TRY(broadcast(kn, &in[0], &in[1], &b, &period));
    void *y;
    OrtStatus *s = output(kn, ctx, in[0].dims, in[0].rank, &y);
    if (!s && rows) {
        epilogue_t e = requant_epilogue(kn, EPI_ADD, in[2].data, in[4].data);
        e.mb = in[3].data;
        e.pb = (int32_t)attr(kn, "pb");
        go_add(in[0].data, b ? b : in[1].data, period / C, rows, C, &e, y, live, threads_of(kn));
    }
    free(b);
    return s;
}

/* ---- IntTokenMerge: cpu_integer_ops.int_token_merge ---------------------------------------------------- */
static OrtStatus *token_merge(kernel_t *kn, OrtKernelContext *ctx, size_t count) {
    const OrtApi *api = kn->api;
    tensor_t in[3];
    for (size_t i = 0; i < 3; i++) TRY(input(kn, ctx, count, i, &in[i]));
    const tensor_t *x = &in[0], *keys = &in[1], *sizes = &in[2];
    if (x->type != T_INT32 || x->rank != 3) return fail(api, kn, "x must be int32 [B, N, C], got %s of rank %zu",
                                                        type_name(x->type), x->rank);
    int64_t B = x->dims[0], n = x->dims[1], C = x->dims[2], axis = attr(kn, "heads_axis");
    if (axis != 0 && axis != 1 && axis != 2)
        return fail(api, kn, "heads_axis must be 0, 1 or 2, got %lld", (long long)axis);
    int64_t rank = axis ? 4 : 3, tokens = axis == 1 ? 2 : 1;    /* keys [B, N, d], [B, H, N, d] or [B, N, H, d] */
    if ((keys->type != T_INT32 && keys->type != T_INT8 && keys->type != T_UINT8) || (int64_t)keys->rank != rank ||
        keys->dims[0] != B || keys->dims[tokens] != n)
        return fail(api, kn, "keys must be 8- or 32-bit %s with x's B and N, got %s of rank %zu",
                    axis == 0 ? "[B, N, d]" : axis == 1 ? "[B, H, N, d]" : "[B, N, H, d]", type_name(keys->type),
                    keys->rank);
    if (sizes->type != T_INT32 || sizes->rank < 2 || sizes->dims[0] != B || sizes->dims[1] != n ||
        sizes->numel != B * n)
        return fail(api, kn, "sizes must be int32 [B, N, 1] with x's B and N, got %s of rank %zu",
                    type_name(sizes->type), sizes->rank);
    int64_t r = attr(kn, "r"), p = attr(kn, "protected"), shift = attr(kn, "shift"), d = keys->dims[rank - 1];
    int64_t H = axis ? keys->dims[axis] : 1, kn_ = axis == 1 ? d : H * d, kh = axis == 1 ? n * d : d;   /* strides */
    if (shift < 0) return fail(api, kn, "negative key shift %lld", (long long)shift);
    int64_t most = n - p < 0 ? 0 : (n - p) / 2;   /* effective_r: min(r, (n - protected) // 2), at least 0 */
    r = r < 0 ? 0 : r < most ? r : most;
    int64_t xd[3] = {B, n - r, C}, sd[8];
    memcpy(sd, sizes->dims, sizeof(int64_t) * sizes->rank);
    sd[1] = n - r;
    void *y, *ys;
    TRY(output_at(kn, ctx, 0, xd, 3, &y));
    TRY(output_at(kn, ctx, 1, sd, sizes->rank, &ys));
    if (r == 0) {                       /* nothing to merge: the reference returns its inputs */
        memcpy(y, x->data, sizeof(int32_t) * (size_t)x->numel);
        memcpy(ys, sizes->data, sizeof(int32_t) * (size_t)sizes->numel);
        return NULL;
    }
    int key_type = keys->type == T_INT32 ? KEY_I32 : keys->type == T_INT8 ? KEY_I8 : KEY_U8;
    int status = gt_token_merge(x->data, keys->data, key_type, H, H * n * d, kn_, kh, 1, sizes->data, B, n, C, d, r, p,
                                (int32_t)(shift < 31 ? shift : 31), y, ys, threads_of(kn));
    return status ? fail(api, kn, "a token size is below 1 (sizes are token counts)") : NULL;
}

/* ---- IntQuantize, IntDequantize: cpu_integer_ops.int_quantize / int_dequantize --------------------------- */
static OrtStatus *quantize(kernel_t *kn, OrtKernelContext *ctx, size_t count) {
    tensor_t x;
    TRY(input(kn, ctx, count, 0, &x));
    if (x.type != T_FLOAT) return fail(kn->api, kn, "x must be float, got %s", type_name(x.type));
    void *y;
    const int64_t *p = kn->patch;
    if (p[0]) {                         /* a ViT's patches: [B, C, H, W] -> [B, H/ph, W/pw, C, ph, pw] */
        if (x.rank != 4 || x.dims[1] != p[2] || x.dims[2] != p[3] || x.dims[3] != p[4] || p[3] % p[0] || p[4] % p[1])
            return fail(kn->api, kn, "x must be [B, %lld, %lld, %lld] images in whole %lld x %lld patches, got "
                        "rank %zu", (long long)p[2], (long long)p[3], (long long)p[4], (long long)p[0],
                        (long long)p[1], x.rank);
        int64_t dims[6] = {x.dims[0], p[3] / p[0], p[4] / p[1], p[2], p[0], p[1]};
        TRY(output(kn, ctx, dims, 6, &y));
        if (x.numel) ge_quantize_patches(x.data, x.dims[0], p[2], p[3], p[4], p[0], p[1], kn->inv_scale,
                                         (float)attr(kn, "lo"), (float)attr(kn, "hi"), (int32_t)attr(kn, "zero_point"),
                                         kn->out_type, y, threads_of(kn));
        return NULL;
    }
    TRY(output(kn, ctx, x.dims, x.rank, &y));
    /* lo and hi as the float32 values torch.clamp compares with (round to nearest, as cpu_integer_edges.py) */
    if (x.numel) ge_quantize(x.data, x.numel, kn->inv_scale, (float)attr(kn, "lo"), (float)attr(kn, "hi"),
                             (int32_t)attr(kn, "zero_point"), kn->out_type, y, threads_of(kn));
    return NULL;
}

static OrtStatus *dequantize(kernel_t *kn, OrtKernelContext *ctx, size_t count) {
    tensor_t in[3];
    for (size_t i = 0; i < 3; i++) TRY(input(kn, ctx, count, i, &in[i]));
    const tensor_t *x = &in[0];
    if (x->type != T_UINT8 && x->type != T_INT8 && x->type != T_INT32)
        return fail(kn->api, kn, "x must be uint8, int8 or int32, got %s", type_name(x->type));
    int64_t C = x->rank ? x->dims[x->rank - 1] : 1, rows = C ? x->numel / C : 0;
    for (int i = 1; i < 3; i++) {
        const char *what = i == 1 ? "scale" : "offset";
        if (!in[i].data) continue;
        if (in[i].type != T_FLOAT) return fail(kn->api, kn, "%s must be float, got %s", what, type_name(in[i].type));
        if (in[i].numel < C) return fail(kn->api, kn, "%s has %lld values, needs %lld", what,
                                         (long long)in[i].numel, (long long)C);
    }
    void *y;
    TRY(output(kn, ctx, x->dims, x->rank, &y));
    if (rows) ge_dequantize(x->data, out_code(x->type), rows, C, (int32_t)attr(kn, "zero_point"), in[1].data,
                            in[2].data, y, threads_of(kn));
    return NULL;
}

static OrtStatus *compute(void *p, OrtKernelContext *ctx) {
    kernel_t *kn = p;
    size_t count;
    TRY(kn->api->KernelContext_GetInputCount(ctx, &count));
    switch (kn->op) {
    case OP_GEMM: return gemm(kn, ctx, count);
    case OP_BMM: return bmm(kn, ctx, count);
    case OP_LAYERNORM: return layernorm(kn, ctx, count);
    case OP_SHIFTMAX: return shiftmax(kn, ctx, count);
    case OP_REQUANT: return requant(kn, ctx, count);
    case OP_ADD: return add(kn, ctx, count);
    case OP_TOKEN_MERGE: return token_merge(kn, ctx, count);
    case OP_QUANTIZE: return quantize(kn, ctx, count);
    default: return dequantize(kn, ctx, count);
    }
}

/* ---- registration ------------------------------------------------------------------------------------- */
static const char *op_name(const OrtCustomOp *op) { return ((const custom_op_t *)op)->name; }
static const char *op_provider(const OrtCustomOp *op) { (void)op; return NULL; }     /* the CPU provider */
static int op_input_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return T_UNDEFINED; }
static size_t op_input_count(const OrtCustomOp *op) { return (size_t)SPECS[((const custom_op_t *)op)->op].inputs; }
static int op_output_type(const OrtCustomOp *op, size_t i) { (void)i; return OUT_ONNX[((const custom_op_t *)op)->out_type]; }
static size_t op_output_count(const OrtCustomOp *op) { return (size_t)SPECS[((const custom_op_t *)op)->op].outputs; }
static int op_input_characteristic(const OrtCustomOp *op, size_t i) {
    return (int)i < SPECS[((const custom_op_t *)op)->op].required ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
static int op_output_characteristic(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return INPUT_OUTPUT_REQUIRED; }
static int op_input_memory(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }   /* OrtMemTypeDefault */

static custom_op_t VARIANTS[N_OPS * N_OUTS];
static int n_variants;
static pthread_once_t variants_once = PTHREAD_ONCE_INIT;

static void make_variants(void) {
    for (int op = 0; op < N_OPS; op++)
        for (int out = 0; out < N_OUTS; out++) {
            if (!(SPECS[op].out_types >> out & 1)) continue;
            custom_op_t *v = &VARIANTS[n_variants++];
            v->op = op;
            v->out_type = out;
            snprintf(v->name, sizeof v->name, "%s_%s", SPECS[op].name, OUT_NAMES[out]);
            v->base = (OrtCustomOp){.version = GO_ORT_API_VERSION, .GetName = op_name,
                                    .GetExecutionProviderType = op_provider, .GetInputType = op_input_type,
                                    .GetInputTypeCount = op_input_count, .GetOutputType = op_output_type,
                                    .GetOutputTypeCount = op_output_count, .KernelDestroy = destroy_kernel,
                                    .GetInputCharacteristic = op_input_characteristic,
                                    .GetOutputCharacteristic = op_output_characteristic,
                                    .GetInputMemoryType = op_input_memory, .CreateKernelV2 = create_kernel,
                                    .KernelComputeV2 = compute};
        }
}

/* The entry point SessionOptions.register_custom_ops_library calls. */
EXPORT OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    const OrtApi *api = base->GetApi(GO_ORT_API_VERSION);
    if (!api) {                         /* every runtime has version 1's CreateStatus at slot 0 */
        const OrtApi *old = base->GetApi(1);
        char msg[256];
        snprintf(msg, sizeof msg, "graphopt's cpu_integer custom ops need ONNX Runtime >= 1.%d (C API version %d); "
                 "this is onnxruntime %s", GO_ORT_API_VERSION, GO_ORT_API_VERSION, base->GetVersionString());
        return old ? old->CreateStatus(ORT_FAIL, msg) : NULL;
    }
    pthread_once(&variants_once, make_variants);
    OrtCustomOpDomain *domain;          /* lives as long as the process: sessions keep using it */
    TRY(api->CreateCustomOpDomain("ai.graphopt.cpu_integer", &domain));
    for (int i = 0; i < n_variants; i++) TRY(api->CustomOpDomain_Add(domain, &VARIANTS[i].base));
    return api->AddCustomOpDomain(options, domain);
}
