/* ddim.h: the C API of the ddim engine (DDIM diffusion sampling of exported U-Nets, on the CPU or
 * a CUDA GPU). Plain C99 (also valid C++): opaque handles, status codes, option structs.
 *
 * ABI: this C API is the engine's stable ABI. The shared library's SONAME (libddim.so.N, N =
 * DDIM_ABI_VERSION) changes only when it breaks; new functions and new trailing fields of the
 * option structs keep it. (The C++ API, ddim/ddim.hpp, promises source compatibility only.)
 *
 * Conventions
 *   - Every function that can fail returns a ddim_status; DDIM_OK is 0. On failure,
 *     ddim_last_error() returns a message naming the problem, for the calling thread, until its
 *     next ddim call. No C++ exception crosses this API (allocation failures included).
 *   - Option structs begin with `size_t struct_size`: set it to sizeof(the struct) (the
 *     *_options_init functions do, and fill the defaults). The library reads only the fields that
 *     fit in struct_size, so a program built against an older header keeps working; a larger
 *     struct_size (a newer header) is accepted when the fields this library does not know are 0.
 *     Output structs (ddim_model_info, ...) work the same way: the library fills what fits.
 *   - Arrays are passed as a pointer and a count of elements. An input's count must be exactly
 *     what the call reads; an output buffer's count at least what it writes (the call writes that
 *     prefix and never past it). Anything else is DDIM_ERR_INVALID_ARGUMENT, before any work.
 *     Images are float32 (N, C, H, W), row-major; sizes: ddim_session_get_shape, and
 *     ddim_session_timesteps for per-step arrays. A NULL pointer with a count of 0 is "not given".
 *   - Progress callbacks: int (*)(void* user, int done, int total), called after every step on the
 *     calling thread; a non-zero return cancels at the next step boundary and the call returns
 *     DDIM_ERR_CANCELLED. (In C++ the callback cancels by returning false.)
 *
 * Thread safety
 *   - ddim_model: immutable once loaded; every function taking a const ddim_model* may run on any
 *     number of threads at once. ddim_model_retain / ddim_model_release are thread-safe.
 *   - ddim_session: used by one thread at a time (calls on one session must not overlap; calls on
 *     different sessions may, from any threads, also sessions of one model).
 *   - ddim_scheduler: immutable; every function on it is thread-safe.
 *   - ddim_last_error is per thread; the other free functions are thread-safe.
 *   - A session keeps its model alive: the model may be released right after creating sessions.
 */
#ifndef DDIM_DDIM_H
#define DDIM_DDIM_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define DDIM_C_API
#else
#define DDIM_C_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define DDIM_VERSION_MAJOR 0
#define DDIM_VERSION_MINOR 1
#define DDIM_VERSION_PATCH 0
#define DDIM_ABI_VERSION 1

/* ------------------------------------------------------------------ status */

typedef enum ddim_status {
  DDIM_OK = 0,
  DDIM_ERR_INVALID_FILE = 1,     /* a model file that is corrupt, hostile or of an unknown version */
  DDIM_ERR_INVALID_ARGUMENT = 2, /* a bad argument: null pointer, wrong count, unknown enum value, a host
                                    pointer where device memory is required, a CUDA call on a CPU session */
  DDIM_ERR_UNSUPPORTED = 3,      /* valid but not supported here (op, precision, backend) */
  DDIM_ERR_OUT_OF_MEMORY = 4,    /* host or device allocation failed */
  DDIM_ERR_DEVICE_LOST = 5,      /* a sticky device error: the session is unusable */
  DDIM_ERR_CANCELLED = 6,        /* the progress callback asked to stop */
  DDIM_ERR_IO = 7,               /* a file could not be opened, read or written */
  DDIM_ERR_INTERNAL = 8          /* a bug in ddim: please report it */
} ddim_status;

/* "DDIM_OK", "DDIM_ERR_IO", ...; "DDIM_ERR_UNKNOWN" for other values. Thread-safe. */
DDIM_C_API const char* ddim_status_name(ddim_status status);
/* The calling thread's last error message ("" when its last call succeeded). The pointer is
   valid until the thread's next ddim call. */
DDIM_C_API const char* ddim_last_error(void);
/* The library's version, "MAJOR.MINOR.PATCH", and the ABI version it implements. */
DDIM_C_API const char* ddim_version(void);
DDIM_C_API int ddim_abi_version(void);
/* Usable CUDA devices (0 without a GPU, a driver, or a CUDA build). Never fails. */
DDIM_C_API int ddim_cuda_device_count(void);

/* ------------------------------------------------------------------ enums (int fields) */

enum { DDIM_BACKEND_AUTO = 0, DDIM_BACKEND_CPU = 1, DDIM_BACKEND_CUDA = 2 };
enum { DDIM_PRECISION_AUTO = 0, DDIM_PRECISION_FP32 = 1, DDIM_PRECISION_FP16 = 2, DDIM_PRECISION_BF16 = 3 };
enum { DDIM_BETA_LINEAR = 0, DDIM_BETA_SCALED_LINEAR = 1, DDIM_BETA_SQUAREDCOS_CAP_V2 = 2 };
enum { DDIM_PREDICT_EPSILON = 0, DDIM_PREDICT_V = 1, DDIM_PREDICT_SAMPLE = 2 };
/* DDIM_SPACING_DEFAULT: the model's (or scheduler's) timestep_spacing. */
enum {
  DDIM_SPACING_DEFAULT = -1, DDIM_SPACING_LEADING = 0, DDIM_SPACING_TRAILING = 1, DDIM_SPACING_LINSPACE = 2,
  DDIM_SPACING_UNIFORM = 3, DDIM_SPACING_QUADRATIC = 4, DDIM_SPACING_LOG = 5
};
enum {
  DDIM_VARIANCE_DEFAULT = -1, DDIM_VARIANCE_FIXED_SMALL = 0, DDIM_VARIANCE_FIXED_SMALL_LOG = 1,
  DDIM_VARIANCE_FIXED_LARGE = 2, DDIM_VARIANCE_FIXED_LARGE_LOG = 3, DDIM_VARIANCE_LEARNED = 4,
  DDIM_VARIANCE_LEARNED_RANGE = 5
};
enum { DDIM_MODEL_TIME_CURRENT = 0, DDIM_MODEL_TIME_NEXT = 1 };
/* The element type of images written into a caller's device buffer. */
enum { DDIM_OUTPUT_FLOAT32 = 0, DDIM_OUTPUT_SESSION_PRECISION = 1 };
/* Tri-state options: the model's default, off, on. */
enum { DDIM_DEFAULT = -1, DDIM_OFF = 0, DDIM_ON = 1 };

typedef int (*ddim_progress_fn)(void* user, int done, int total);

/* ------------------------------------------------------------------ models */

typedef struct ddim_model ddim_model;

/* Loads and validates a model file. *out receives a new reference (release it with
   ddim_model_release). */
DDIM_C_API ddim_status ddim_model_load(const char* path, ddim_model** out);
/* The same from the whole file in memory (copied; `bytes` may be freed on return). */
DDIM_C_API ddim_status ddim_model_load_memory(const void* bytes, size_t size, ddim_model** out);
/* Another reference to the model; every reference is released once. */
DDIM_C_API ddim_model* ddim_model_retain(ddim_model* model);
/* Drops one reference (NULL: nothing). The model lives on while sessions use it. */
DDIM_C_API void ddim_model_release(ddim_model* model);

typedef struct ddim_model_info {
  size_t struct_size;
  int format_version;
  int in_channels;  /* of the sample */
  int out_channels;
  int height, width; /* the sample size the model declares */
  int64_t parameter_count;
  int64_t node_count;
  /* Class conditioning (format version 2): DDIM_CLASS_NONE for an unconditional model, else the
     kind of its labels; num_classes (INDEX) and class_dim (values per sample: 1, or D for VECTOR);
     has_null: the file records the unconditional input for guidance. */
  int class_kind;
  int num_classes;
  int class_dim;
  int has_null;
  /* Latent models (format version 2; README "Latent models (LDM)"): the U-Net samples latents of
     (in_channels, height, width) and a decoder (DDIM_DECODER_VQ: VQModel, DDIM_DECODER_KL:
     AutoencoderKL) turns them into images of (image_channels, factor * height, factor * width);
     its input is latents / scaling_factor + shift_factor. A pixel-space model: DDIM_DECODER_NONE,
     latent_factor 1, image_channels = in_channels, scaling_factor 1, shift_factor 0.
     decoder_parameter_count: the decoder's weight values (parameter_count is the U-Net's). */
  int decoder;
  int latent_factor;
  int image_channels;
  double scaling_factor;
  double shift_factor;
  int64_t decoder_parameter_count;
} ddim_model_info;
enum { DDIM_CLASS_NONE = 0, DDIM_CLASS_INDEX = 1, DDIM_CLASS_SCALAR = 2, DDIM_CLASS_VECTOR = 3 };
enum { DDIM_DECODER_NONE = 0, DDIM_DECODER_VQ = 1, DDIM_DECODER_KL = 2 };
DDIM_C_API ddim_status ddim_model_get_info(const ddim_model* model, ddim_model_info* info);
/* The human-readable architecture summary (`ddim info`): writes min(length + 1, capacity) bytes,
   NUL-terminated when capacity > 0 (truncated to fit); *length (may be NULL) receives the full
   length without the NUL. buffer may be NULL with capacity 0 (to ask for the length). */
DDIM_C_API ddim_status ddim_model_get_summary(const ddim_model* model, char* buffer, size_t capacity, size_t* length);

/* A noise schedule (diffusers' scheduler config). ddim_schedule_init fills DDIMScheduler's
   defaults. alphas_cumprod: an explicit table (alphas_cumprod_count = num_train_timesteps) or
   NULL (from the betas); from ddim_model_get_schedule it points into the model, valid while the
   model is. */
typedef struct ddim_schedule {
  size_t struct_size;
  int num_train_timesteps;
  int beta_schedule;          /* DDIM_BETA_* */
  double beta_start, beta_end;
  const double* alphas_cumprod;
  size_t alphas_cumprod_count;
  int rescale_betas_zero_snr; /* 0 / 1 */
  int prediction_type;        /* DDIM_PREDICT_* */
  int timestep_spacing;       /* DDIM_SPACING_* (not DEFAULT) */
  int steps_offset;
  int clip_sample;            /* 0 / 1 */
  double clip_sample_range;
  int set_alpha_to_one;       /* 0 / 1 */
  int thresholding;           /* 0 / 1 */
  double dynamic_thresholding_ratio;
  double sample_max_value;
  int variance_type;          /* DDIM_VARIANCE_* (not DEFAULT) */
} ddim_schedule;
DDIM_C_API void ddim_schedule_init(ddim_schedule* schedule);
DDIM_C_API ddim_status ddim_model_get_schedule(const ddim_model* model, ddim_schedule* schedule);

/* ------------------------------------------------------------------ sessions */

typedef struct ddim_session ddim_session;

typedef struct ddim_session_options {
  size_t struct_size;
  int backend;          /* DDIM_BACKEND_*; AUTO: CUDA when a device can take the plan, else the CPU */
  int device;           /* CUDA device ordinal */
  int batch;            /* 1 .. 65535 */
  int precision;        /* DDIM_PRECISION_*; AUTO: fp16 on CUDA, fp32 on the CPU */
  int height, width;    /* 0: the model's size */
  int threads;          /* CPU worker threads; 0: the hardware's */
  int profile;          /* CUDA: eager steps with an NVTX range per node */
  int autotune;         /* CUDA: time every cuDNN engine at plan time */
  int whole_loop_graph; /* CUDA: every step of a sample in one CUDA graph */
  /* Latent models: height and width are the decoded image's pixels (multiples of the decoder's
     factor). decode (default 1): ddim_session_sample decodes the final latents into images;
     0: no decoder is planned and it returns the latents. Ignored for pixel-space models. */
  int decode;
} ddim_session_options;
DDIM_C_API void ddim_session_options_init(ddim_session_options* options);
/* Plans the model for one batch size, precision and sample size. options NULL: the defaults.
   The session holds a reference to the model. */
DDIM_C_API ddim_status ddim_session_create(ddim_model* model, const ddim_session_options* options, ddim_session** out);
DDIM_C_API void ddim_session_release(ddim_session* session); /* NULL: nothing */
/* The shape of one call: the sampled space (n, c, h, w) (x_T, trajectory, x0, forward, invert;
   a latent model's latents) and the model output's channels out_c (forward); the backend actually
   used (DDIM_BACKEND_CPU or DDIM_BACKEND_CUDA). Any pointer may be NULL. */
DDIM_C_API ddim_status ddim_session_get_shape(const ddim_session* session, int* n, int* c, int* h, int* w, int* out_c);
/* The images ddim_session_sample writes (n, c, h, w): a latent model's decoded images when the
   session decodes, else the same as ddim_session_get_shape. Any pointer may be NULL. */
DDIM_C_API ddim_status ddim_session_get_image_shape(const ddim_session* session, int* n, int* c, int* h, int* w);
DDIM_C_API ddim_status ddim_session_get_backend(const ddim_session* session, int* backend);

typedef struct ddim_plan_info {
  size_t struct_size;
  const char* backend;   /* "cpu (2 threads)", "cuda:0 (NVIDIA H100 ...)" */
  const char* precision; /* "fp32", "fp16", "bf16" */
  int batch, height, width;
  size_t arena_bytes, unplanned_bytes, weight_bytes;
  double forward_flops;  /* one forward of the batch */
  const char* const* fusions;      size_t fusion_count;
  const char* const* folded_nodes; size_t folded_node_count;
  const char* const* warnings;     size_t warning_count;
  const char* fallback;  /* AUTO on the CPU although a CUDA device exists: why; else "" */
  /* Class-conditional models: the folded nodes evaluated per (step, class label), and the samples
     the memory plan holds (2 x batch: guidance's conditional and null halves; else the batch). */
  const char* const* folded_per_label; size_t folded_per_label_count;
  int forward_batch;
  /* Latent models: the decoder's plan in one line ("" when none is planned: a pixel-space model
     or decode 0); its arena is not in arena_bytes. height and width above are the latents'. */
  const char* decoder;
} ddim_plan_info;
/* The strings point into the session: valid until its next call (or release). */
DDIM_C_API ddim_status ddim_session_get_plan_info(ddim_session* session, ddim_plan_info* info);

/* Class labels and classifier-free guidance for a class-conditional model (ddim::ClassConditioning
   in ddim/session.hpp; README "Class-conditional models"). An unconditional model refuses any
   setting here other than the defaults; a conditional one needs labels. */
typedef struct ddim_class_conditioning {
  size_t struct_size;
  const double* class_labels;         /* index / scalar models: 1 (for all) or N labels */
  size_t class_label_count;
  const float* class_embeddings;      /* vector models: D (for all) or N * D values */
  size_t class_embedding_count;
  double guidance_scale;              /* w in [0, 1000]; default 1: the conditional model only */
  double guidance_rescale;            /* diffusers' guidance_rescale in [0, 1]; default 0 (off) */
  int has_null_class_label;           /* non-zero: null_class_label replaces the file's null label */
  double null_class_label;
  const float* null_class_embedding;  /* vector models: D values replacing the file's; NULL: the file's */
  size_t null_class_embedding_count;
} ddim_class_conditioning;
DDIM_C_API void ddim_class_conditioning_init(ddim_class_conditioning* conditioning);

typedef struct ddim_sample_options {
  size_t struct_size;
  int steps;                 /* default 50 */
  int spacing;               /* DDIM_SPACING_*; DEFAULT: the model's */
  const int* timesteps;      /* a custom list (strictly decreasing), overriding steps and spacing */
  size_t timestep_count;
  double eta;                /* default 0 */
  uint64_t seed;             /* sample i uses seed + i ... */
  const uint64_t* seeds;     /* ... unless seeds has one per sample (seed_count = N) */
  size_t seed_count;
  const float* x_T;          /* optional host (N, C, H, W) start */
  size_t x_T_count;
  const float* noise;        /* optional host (S, N, C, H, W) unit-normal noise, per step taken (eta > 0) */
  size_t noise_count;
  int clip_sample;           /* DDIM_DEFAULT / OFF / ON */
  int set_alpha_to_one;      /* DDIM_DEFAULT / OFF / ON */
  int steps_offset;          /* -1: the model's */
  int use_clipped_model_output;
  float* trajectory;         /* optional (S + 1, N, C, H, W): x_T, then x after each step */
  size_t trajectory_count;
  float* x0;                 /* optional (S, N, C, H, W): each step's x0 prediction */
  size_t x0_count;
  ddim_progress_fn progress; /* optional */
  void* progress_user;
  /* CUDA sessions: device memory of the session's device (see ddim_session_set_stream) */
  const float* x_T_device;   /* (N, C, H, W) fp32, instead of x_T */
  const float* noise_device; /* (S, N, C, H, W) fp32, instead of noise */
  void* output_device;       /* the final images, instead of the host `images` buffer */
  int output_type;           /* DDIM_OUTPUT_FLOAT32 or DDIM_OUTPUT_SESSION_PRECISION */
  const ddim_class_conditioning* conditioning; /* class-conditional models; NULL: none */
} ddim_sample_options;
DDIM_C_API void ddim_sample_options_init(ddim_sample_options* options);

/* The timesteps a sample with these options visits (S of them; S can differ from steps): sizes
   trajectory (S + 1), x0 and noise (S). Writes min(S, capacity) entries; *count receives S.
   timesteps may be NULL with capacity 0 (to ask for S). */
DDIM_C_API ddim_status ddim_session_timesteps(const ddim_session* session, const ddim_sample_options* options,
                                              int* timesteps, size_t capacity, size_t* count);
/* DDIM sampling of the whole batch into images (N * C * H * W floats; may be NULL when
   output_device is set). */
DDIM_C_API ddim_status ddim_session_sample(ddim_session* session, const ddim_sample_options* options, float* images,
                                           size_t image_count);

typedef struct ddim_ddpm_options {
  size_t struct_size;
  uint64_t seed;
  const uint64_t* seeds;
  size_t seed_count;
  const float* x_T;
  size_t x_T_count;
  const float* noise;        /* optional (T, N, C, H, W) */
  size_t noise_count;
  int variance;              /* DDIM_VARIANCE_DEFAULT, FIXED_SMALL or FIXED_LARGE */
  int clip_sample;           /* DDIM_DEFAULT / OFF / ON */
  float* trajectory;         /* optional (T + 1, N, C, H, W) */
  size_t trajectory_count;
  float* x0;                 /* optional (T, N, C, H, W) */
  size_t x0_count;
  ddim_progress_fn progress;
  void* progress_user;
} ddim_ddpm_options;
DDIM_C_API void ddim_ddpm_options_init(ddim_ddpm_options* options);
/* DDPM ancestral sampling over all T training timesteps (for comparison with DDIM). */
DDIM_C_API ddim_status ddim_session_sample_ddpm(ddim_session* session, const ddim_ddpm_options* options, float* images,
                                                size_t image_count);

typedef struct ddim_invert_options {
  size_t struct_size;
  int steps;                 /* default 50 */
  int spacing;               /* DDIM_SPACING_* */
  const int* timesteps;      /* in sampling order (strictly decreasing), as ddim_sample_options */
  size_t timestep_count;
  int model_time;            /* DDIM_MODEL_TIME_* */
  int refine;                /* fixed-point refinements per step (CURRENT only), 0 .. 100 */
  float* trajectory;         /* optional (S + 1, N, C, H, W) */
  size_t trajectory_count;
  ddim_progress_fn progress;
  void* progress_user;
  const ddim_class_conditioning* conditioning; /* class-conditional models (every model evaluation); NULL: none */
} ddim_invert_options;
DDIM_C_API void ddim_invert_options_init(ddim_invert_options* options);
/* Deterministic DDIM inversion of x0 (N, C, H, W) into x_T (same size). */
DDIM_C_API ddim_status ddim_session_invert(ddim_session* session, const float* x0, size_t x0_count,
                                           const ddim_invert_options* options, float* x_T, size_t x_T_count);

/* Called with every graph node's output during a dumped forward: its name, shape (rank 2 or 4)
   and values (valid during the call only). */
typedef void (*ddim_node_fn)(void* user, const char* node, const int64_t* shape, size_t rank, const float* values,
                             size_t count);
/* One network forward pass: x (N, C, H, W), t one timestep for all (t_count 1) or one per sample;
   out (N, out_c, H, W). dump may be NULL. */
DDIM_C_API ddim_status ddim_session_forward(ddim_session* session, const float* x, size_t x_count, const int* t,
                                            size_t t_count, float* out, size_t out_count, ddim_node_fn dump, void* user);
/* The same for a class-conditional model, with its labels (conditioning may be NULL for an
   unconditional model); with guidance_scale != 1 the guided output (dump must then be NULL). */
DDIM_C_API ddim_status ddim_session_forward_conditioned(ddim_session* session, const float* x, size_t x_count,
                                                        const int* t, size_t t_count,
                                                        const ddim_class_conditioning* conditioning, float* out,
                                                        size_t out_count, ddim_node_fn dump, void* user);

/* A latent model's decoder alone (a session created with decode 1): latents (N, C, h, w) of the
   session's batch and latent size (ddim_session_get_shape) into images (ddim_session_get_image_shape),
   as ddim_session_sample decodes its final latents. A pixel-space model or a session with decode 0:
   DDIM_ERR_INVALID_ARGUMENT. dump may be NULL (else every decoder node's output). */
DDIM_C_API ddim_status ddim_session_decode(ddim_session* session, const float* latents, size_t latent_count,
                                           float* images, size_t image_count, ddim_node_fn dump, void* user);

/* ---- CUDA sessions in the caller's GPU pipeline (a CPU session: DDIM_ERR_INVALID_ARGUMENT) */
/* Every later call of the session enqueues its work on `cuda_stream` (a cudaStream_t of the
   session's device; NULL: the session's own stream). The session makes the new stream wait for
   what it enqueued on the old one (no host synchronisation); the caller orders its own buffers.
   The stream must stay valid until the session is released or given another stream. */
DDIM_C_API ddim_status ddim_session_set_stream(ddim_session* session, void* cuda_stream);
/* A whole sample enqueued on the session's stream; returns at once (no host synchronisation).
   Needs output_device; x_T / noise from the seeds or x_T_device / noise_device; no trajectory, x0
   or progress. The images are in output_device when the stream reaches that point. The first call
   with new options may allocate (and so synchronise). It may be captured into the caller's own
   CUDA graph (cudaStreamBeginCapture on the session's stream) after one call with the same
   options outside the capture; otherwise DDIM_ERR_INVALID_ARGUMENT before anything is enqueued. */
DDIM_C_API ddim_status ddim_session_sample_async(ddim_session* session, const ddim_sample_options* options);

/* ------------------------------------------------------------------ the scheduler alone */

typedef struct ddim_scheduler ddim_scheduler;
/* A scheduler for a schedule (validated); any denoiser can drive it. */
DDIM_C_API ddim_status ddim_scheduler_create(const ddim_schedule* schedule, ddim_scheduler** out);
DDIM_C_API void ddim_scheduler_release(ddim_scheduler* scheduler); /* NULL: nothing */
/* The timesteps of num_steps steps (spacing DDIM_SPACING_DEFAULT: the schedule's; steps_offset -1:
   the schedule's); as ddim_session_timesteps. */
DDIM_C_API ddim_status ddim_scheduler_timesteps(const ddim_scheduler* scheduler, int num_steps, int spacing,
                                                int steps_offset, int* timesteps, size_t capacity, size_t* count);

typedef struct ddim_step_options {
  size_t struct_size;
  double eta;
  int use_clipped_model_output;
  int clip_sample;           /* DDIM_DEFAULT / OFF / ON */
  int set_alpha_to_one;      /* DDIM_DEFAULT / OFF / ON */
} ddim_step_options;
DDIM_C_API void ddim_step_options_init(ddim_step_options* options);

typedef struct ddim_step_coefficients {
  size_t struct_size;
  int t, t_prev;            /* t_prev -1: the final step */
  double alpha_t, alpha_prev, sigma, dir;
} ddim_step_coefficients;
/* The coefficients of the step t -> t_prev (-1: the final step). options NULL: defaults. */
DDIM_C_API ddim_status ddim_scheduler_step_coefficients(const ddim_scheduler* scheduler, int t, int t_prev,
                                                        const ddim_step_options* options, ddim_step_coefficients* out);
/* One DDIM step on caller arrays of batch samples of sample_size floats each:
   prev_sample = step(model_output, t -> t_prev, sample). noise (same size) is required when
   sigma > 0; pred_x0 (same size) receives the x0 prediction when not NULL. */
DDIM_C_API ddim_status ddim_scheduler_step(const ddim_scheduler* scheduler, const float* model_output, int t, int t_prev,
                                           const float* sample, float* prev_sample, size_t batch, size_t sample_size,
                                           const ddim_step_options* options, const float* noise, float* pred_x0);

/* ------------------------------------------------------------------ toolkit */

/* Spherical interpolation of two vectors of count floats (t in [0, 1]) into out. */
DDIM_C_API ddim_status ddim_slerp(const float* a, const float* b, size_t count, double t, float* out);
/* The x_T a sample with this seed starts from (count = C * H * W floats). */
DDIM_C_API ddim_status ddim_initial_noise(uint64_t seed, float* out, size_t count);

#ifdef __cplusplus
}
#endif

#endif /* DDIM_DDIM_H */
