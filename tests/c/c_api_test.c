/* The C API from C11, against the installed package: every function, every error path, and results
 * bitwise equal to the C++ API (the installed `ddim` tool, which is a C++ API program, wrote the
 * reference .npy files; tests/c/run_c_test.cmake runs it first).
 *
 * usage: ddim_c_api_test MODEL T20_MODEL REF_DIR WORK_DIR [CLASS_MODEL [LATENT_MODEL]]
 *   MODEL      weights/default.ddim (1x32x32)
 *   T20_MODEL  a tiny random model with 20 training timesteps (DDPM in 20 steps)
 *   REF_DIR    sample.npy trajectory.npy x0.npy (--seeds 9,2,5 --steps 6 --eta 0.5),
 *              ddpm.npy (T20_MODEL, --seed 4 --batch 2), invert.npy invert_trajectory.npy
 *              (sample.npy, --steps 5), forward.npy (sample.npy at t = 500)
 *   WORK_DIR   scratch files
 *   CLASS_MODEL, LATENT_MODEL (optional): see the class-conditional and latent-model sections */
#include <ddim/ddim.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond)                                                              \
  do {                                                                           \
    ++g_checks;                                                                  \
    if (!(cond)) {                                                               \
      ++g_failures;                                                              \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
    }                                                                            \
  } while (0)

/* A call that must succeed. */
#define OK(call)                                                                                    \
  do {                                                                                              \
    ddim_status s_ = (call);                                                                        \
    ++g_checks;                                                                                     \
    if (s_ != DDIM_OK) {                                                                            \
      ++g_failures;                                                                                 \
      fprintf(stderr, "%s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #call, ddim_status_name(s_), \
              ddim_last_error());                                                                   \
    }                                                                                               \
  } while (0)

/* A call that must fail with `want` and leave a message containing `text`. */
#define FAILS(want, text, call)                                                                      \
  do {                                                                                               \
    ddim_status s_ = (call);                                                                         \
    ++g_checks;                                                                                      \
    if (s_ != (want) || strstr(ddim_last_error(), (text)) == NULL) {                                 \
      ++g_failures;                                                                                  \
      fprintf(stderr, "%s:%d: %s returned %s (\"%s\"); expected %s with \"%s\"\n", __FILE__, __LINE__, \
              #call, ddim_status_name(s_), ddim_last_error(), ddim_status_name(want), (text));       \
    }                                                                                                \
  } while (0)

/* ------------------------------------------------------------------ files */

static void* read_file(const char* path, size_t* size) {
  FILE* f = fopen(path, "rb");
  char* data;
  long n;
  if (!f) {
    fprintf(stderr, "cannot open %s\n", path);
    exit(2);
  }
  fseek(f, 0, SEEK_END);
  n = ftell(f);
  fseek(f, 0, SEEK_SET);
  data = (char*)malloc((size_t)n + 1);
  if (!data || fread(data, 1, (size_t)n, f) != (size_t)n) {
    fprintf(stderr, "cannot read %s\n", path);
    exit(2);
  }
  fclose(f);
  *size = (size_t)n;
  return data;
}

static void write_file(const char* path, const void* data, size_t size) {
  FILE* f = fopen(path, "wb");
  if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0) {
    fprintf(stderr, "cannot write %s\n", path);
    exit(2);
  }
}

static int contains(const unsigned char* bytes, size_t size, const char* text) {
  const size_t n = strlen(text);
  size_t i;
  for (i = 0; i + n <= size; ++i)
    if (memcmp(bytes + i, text, n) == 0) return 1;
  return 0;
}

/* The float32 data of a .npy file the ddim tool wrote (little-endian, C order). */
typedef struct {
  float* data;
  size_t count;
} array;

static array read_npy(const char* dir, const char* name) {
  char path[4096];
  size_t size, header, offset;
  unsigned char* bytes;
  array a;
  snprintf(path, sizeof path, "%s/%s", dir, name);
  bytes = (unsigned char*)read_file(path, &size);
  if (size < 10 || memcmp(bytes, "\x93NUMPY", 6) != 0) {
    fprintf(stderr, "%s is not a .npy file\n", path);
    exit(2);
  }
  if (bytes[6] == 1) {
    header = (size_t)bytes[8] | (size_t)bytes[9] << 8;
    offset = 10 + header;
  } else {
    header = (size_t)bytes[8] | (size_t)bytes[9] << 8 | (size_t)bytes[10] << 16 | (size_t)bytes[11] << 24;
    offset = 12 + header;
  }
  if (offset > size || !contains(bytes, offset, "'<f4'") || (size - offset) % 4 != 0) {
    fprintf(stderr, "%s is not a float32 .npy file\n", path);
    exit(2);
  }
  a.count = (size - offset) / 4;
  a.data = (float*)malloc(a.count * sizeof(float));
  memcpy(a.data, bytes + offset, a.count * sizeof(float));
  free(bytes);
  return a;
}

/* Bitwise equality of `count` floats with a reference array of exactly that size. */
static int same_bits(const float* got, size_t count, array want) {
  return want.count == count && memcmp(got, want.data, count * sizeof(float)) == 0;
}

/* ------------------------------------------------------------------ callbacks */

typedef struct {
  int calls;
  int last_done, last_total;
  int cancel_at; /* return non-zero when done reaches it (0: never) */
} progress_state;

static int on_progress(void* user, int done, int total) {
  progress_state* p = (progress_state*)user;
  ++p->calls;
  p->last_done = done;
  p->last_total = total;
  return p->cancel_at > 0 && done >= p->cancel_at;
}

typedef struct {
  int nodes;
  int bad_shapes;
  char last[256];
  size_t last_count;
} dump_state;

static void on_node(void* user, const char* node, const int64_t* shape, size_t rank, const float* values, size_t count) {
  dump_state* d = (dump_state*)user;
  size_t i, n = 1;
  ++d->nodes;
  for (i = 0; i < rank; ++i) n *= (size_t)shape[i];
  if ((rank != 2 && rank != 4) || n != count || values == NULL) ++d->bad_shapes;
  snprintf(d->last, sizeof d->last, "%s", node);
  d->last_count = count;
}

/* ------------------------------------------------------------------ threads */

typedef struct {
  int status;
  char message[256];
} thread_result;

/* Another thread sees its own last error: a failing call there does not touch the main thread's. */
static void* failing_thread(void* arg) {
  thread_result* r = (thread_result*)arg;
  ddim_model* m = NULL;
  r->status = ddim_model_load("/nonexistent/dir/model.ddim", &m);
  snprintf(r->message, sizeof r->message, "%s", ddim_last_error());
  return NULL;
}

typedef struct {
  ddim_model* model;
  uint64_t seed;
  float* images;
  size_t count;
  int status;
} sample_job;

/* Sessions of one model sample on several threads at once (the model is shared read-only). */
static void* sampling_thread(void* arg) {
  sample_job* j = (sample_job*)arg;
  ddim_session* s = NULL;
  ddim_session_options so;
  ddim_sample_options o;
  ddim_session_options_init(&so);
  so.backend = DDIM_BACKEND_CPU;
  so.threads = 1;
  j->status = ddim_session_create(j->model, &so, &s);
  if (j->status != DDIM_OK) return NULL;
  ddim_sample_options_init(&o);
  o.steps = 6;
  o.eta = 0.5;
  o.seed = j->seed;
  j->status = ddim_session_sample(s, &o, j->images, j->count);
  ddim_session_release(s);
  return NULL;
}

/* ------------------------------------------------------------------ the test */

/* ------------------------------------------------------------------ latent models */

/* A latent model (ddim-make-model --preset ldm-tiny: 4x8x6 latents, a VQ decoder of factor 2 to
   3x16x12 images, scaling_factor 0.5) through the C API: the model info, the session's decode
   option, ddim_session_decode against sample's own decoding (bitwise on the CPU) and the ddim
   tool's images (ref/latent_sample.npy: --seeds 9,2 --steps 4), and the errors. pixel: a pixel-space
   model. */
static void test_latent(const char* path, const char* ref_dir, ddim_model* pixel) {
  ddim_model* lm = NULL;
  ddim_session *on = NULL, *off = NULL, *ps = NULL;
  ddim_model_info li, old;
  ddim_session_options so;
  ddim_sample_options o;
  ddim_plan_info plan;
  uint64_t seeds[2] = {9, 2};
  int n = 0, c = 0, h = 0, w = 0, in = 0, ic = 0, ih = 0, iw = 0;
  size_t LE = 4 * 8 * 6, IE = 3 * 16 * 12;
  float *latents = (float*)calloc(2 * LE, sizeof(float)), *images = (float*)calloc(2 * IE, sizeof(float));
  float *decoded = (float*)calloc(2 * IE, sizeof(float));
  array ref = read_npy(ref_dir, "latent_sample.npy");
  dump_state dump;

  OK(ddim_model_load(path, &lm));
  memset(&li, 0, sizeof li);
  li.struct_size = sizeof li;
  OK(ddim_model_get_info(lm, &li));
  CHECK(li.format_version == 2 && li.in_channels == 4 && li.height == 8 && li.width == 6);
  CHECK(li.decoder == DDIM_DECODER_VQ && li.latent_factor == 2 && li.image_channels == 3);
  CHECK(li.scaling_factor == 0.5 && li.shift_factor == 0.0 && li.decoder_parameter_count > 0);
  /* A caller built before the latent fields: they are not written. */
  memset(&old, 0x5a, sizeof old);
  old.struct_size = offsetof(ddim_model_info, decoder);
  OK(ddim_model_get_info(lm, &old));
  CHECK(old.has_null == 0 && old.decoder == 0x5a5a5a5a && old.latent_factor == 0x5a5a5a5a);
  /* A pixel-space model's latent fields. */
  {
    ddim_model_info pi;
    memset(&pi, 0, sizeof pi);
    pi.struct_size = sizeof pi;
    OK(ddim_model_get_info(pixel, &pi));
    CHECK(pi.decoder == DDIM_DECODER_NONE && pi.latent_factor == 1 && pi.image_channels == pi.in_channels &&
          pi.scaling_factor == 1.0 && pi.shift_factor == 0.0 && pi.decoder_parameter_count == 0);
  }

  ddim_session_options_init(&so);
  CHECK(so.decode == 1);
  so.backend = DDIM_BACKEND_CPU;
  so.batch = 2;
  so.threads = 1;
  OK(ddim_session_create(lm, &so, &on));
  so.decode = 0;
  OK(ddim_session_create(lm, &so, &off));
  if (on && off) {
    /* Shapes: the sampled space is the latents; sample writes images (decode on) or latents. */
    OK(ddim_session_get_shape(on, &n, &c, &h, &w, NULL));
    CHECK(n == 2 && c == 4 && h == 8 && w == 6);
    OK(ddim_session_get_image_shape(on, &in, &ic, &ih, &iw));
    CHECK(in == 2 && ic == 3 && ih == 16 && iw == 12);
    OK(ddim_session_get_image_shape(off, &in, &ic, &ih, &iw));
    CHECK(in == 2 && ic == 4 && ih == 8 && iw == 6);
    memset(&plan, 0, sizeof plan);
    plan.struct_size = sizeof plan;
    OK(ddim_session_get_plan_info(on, &plan));
    CHECK(plan.decoder != NULL && strstr(plan.decoder, "VQModel") != NULL && plan.height == 8 && plan.width == 6);
    OK(ddim_session_get_plan_info(off, &plan));
    CHECK(plan.decoder != NULL && plan.decoder[0] == '\0');

    ddim_sample_options_init(&o);
    o.steps = 4;
    o.seeds = seeds;
    o.seed_count = 2;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "images holds", ddim_session_sample(on, &o, images, 2 * LE));
    OK(ddim_session_sample(on, &o, images, 2 * IE));
    CHECK(same_bits(images, 2 * IE, ref));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "images holds", ddim_session_sample(off, &o, latents, 2 * LE - 1));
    OK(ddim_session_sample(off, &o, latents, 2 * LE));
    /* Decoding the decode-off session's latents gives sample's images, bitwise. */
    OK(ddim_session_decode(on, latents, 2 * LE, decoded, 2 * IE, NULL, NULL));
    CHECK(memcmp(decoded, images, 2 * IE * sizeof(float)) == 0);
    memset(&dump, 0, sizeof dump);
    OK(ddim_session_decode(on, latents, 2 * LE, decoded, 2 * IE, on_node, &dump));
    CHECK(dump.nodes > 0 && dump.bad_shapes == 0 && strncmp(dump.last, "vqvae", 5) == 0);
    CHECK(memcmp(decoded, images, 2 * IE * sizeof(float)) == 0);

    /* Errors: sizes, NULLs, decode off, a pixel-space model. */
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "latents has", ddim_session_decode(on, latents, 2 * LE - 1, decoded, 2 * IE, NULL, NULL));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "latents has", ddim_session_decode(on, latents, 2 * LE + 1, decoded, 2 * IE, NULL, NULL));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "images holds", ddim_session_decode(on, latents, 2 * LE, decoded, 2 * IE - 1, NULL, NULL));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "latents is NULL", ddim_session_decode(on, NULL, 0, decoded, 2 * IE, NULL, NULL));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "images is NULL", ddim_session_decode(on, latents, 2 * LE, NULL, 0, NULL, NULL));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "decode 0", ddim_session_decode(off, latents, 2 * LE, decoded, 2 * IE, NULL, NULL));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "session is NULL", ddim_session_decode(NULL, latents, 2 * LE, decoded, 2 * IE, NULL, NULL));
  }
  /* An older caller's ddim_session_options (before decode): the default, decode on. */
  {
    ddim_session* os = NULL;
    ddim_session_options_init(&so);
    so.backend = DDIM_BACKEND_CPU;
    so.decode = 0; /* beyond the old struct_size: not read */
    so.struct_size = offsetof(ddim_session_options, decode);
    OK(ddim_session_create(lm, &so, &os));
    if (os) {
      OK(ddim_session_get_image_shape(os, &in, &ic, &ih, &iw));
      CHECK(in == 1 && ic == 3 && ih == 16 && iw == 12);
    }
    ddim_session_release(os);
  }
  /* Pixel sizes that are not a multiple of the factor. */
  ddim_session_options_init(&so);
  so.backend = DDIM_BACKEND_CPU;
  so.height = 15;
  so.width = 12;
  {
    ddim_session* bad = NULL;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "factor", ddim_session_create(lm, &so, &bad));
    CHECK(bad == NULL);
  }
  /* A pixel-space model has no decoder; its image shape is its sample shape. */
  ddim_session_options_init(&so);
  so.backend = DDIM_BACKEND_CPU;
  OK(ddim_session_create(pixel, &so, &ps));
  if (ps) {
    int pc = 0, ph = 0, pw = 0;
    OK(ddim_session_get_shape(ps, NULL, &pc, &ph, &pw, NULL));
    OK(ddim_session_get_image_shape(ps, &in, &ic, &ih, &iw));
    CHECK(in == 1 && ic == pc && ih == ph && iw == pw);
    memset(&plan, 0, sizeof plan);
    plan.struct_size = sizeof plan;
    OK(ddim_session_get_plan_info(ps, &plan));
    CHECK(plan.decoder != NULL && plan.decoder[0] == '\0');
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "not a latent model",
          ddim_session_decode(ps, decoded, (size_t)(pc * ph * pw), decoded, 2 * IE, NULL, NULL));
  }
  ddim_session_release(ps);
  ddim_session_release(on);
  ddim_session_release(off);
  ddim_model_release(lm);
  free(latents);
  free(images);
  free(decoded);
  free(ref.data);
}

int main(int argc, char** argv) {
  const char *model_path, *t20_path, *ref_dir, *work_dir;
  char path[4096];
  ddim_model *model = NULL, *model2 = NULL, *t20 = NULL, *bad = NULL;
  ddim_session *session = NULL, *lone = NULL, *ddpm_session = NULL;
  ddim_scheduler* scheduler = NULL;
  ddim_model_info info;
  ddim_schedule schedule;
  ddim_session_options so;
  ddim_sample_options o;
  ddim_plan_info plan;
  int n = 0, c = 0, h = 0, w = 0, out_c = 0, backend = -1;
  size_t E, S = 0, i;
  int timesteps[64];
  uint64_t seeds[3] = {9, 2, 5};
  float *images, *trajectory, *x0, *one;
  array ref_sample, ref_trajectory, ref_x0;

  if (argc < 5 || argc > 7) {
    fprintf(stderr, "usage: %s MODEL T20_MODEL REF_DIR WORK_DIR [CLASS_MODEL [LATENT_MODEL]]\n", argv[0]);
    return 2;
  }
  model_path = argv[1];
  t20_path = argv[2];
  ref_dir = argv[3];
  work_dir = argv[4];

  /* ---- version and status names */
  {
    char want[64];
    snprintf(want, sizeof want, "%d.%d.%d", DDIM_VERSION_MAJOR, DDIM_VERSION_MINOR, DDIM_VERSION_PATCH);
    CHECK(strcmp(ddim_version(), want) == 0);
    CHECK(ddim_abi_version() == DDIM_ABI_VERSION);
    CHECK(strcmp(ddim_status_name(DDIM_OK), "DDIM_OK") == 0);
    CHECK(strcmp(ddim_status_name(DDIM_ERR_INVALID_FILE), "DDIM_ERR_INVALID_FILE") == 0);
    CHECK(strcmp(ddim_status_name(DDIM_ERR_INVALID_ARGUMENT), "DDIM_ERR_INVALID_ARGUMENT") == 0);
    CHECK(strcmp(ddim_status_name(DDIM_ERR_UNSUPPORTED), "DDIM_ERR_UNSUPPORTED") == 0);
    CHECK(strcmp(ddim_status_name(DDIM_ERR_OUT_OF_MEMORY), "DDIM_ERR_OUT_OF_MEMORY") == 0);
    CHECK(strcmp(ddim_status_name(DDIM_ERR_DEVICE_LOST), "DDIM_ERR_DEVICE_LOST") == 0);
    CHECK(strcmp(ddim_status_name(DDIM_ERR_CANCELLED), "DDIM_ERR_CANCELLED") == 0);
    CHECK(strcmp(ddim_status_name(DDIM_ERR_IO), "DDIM_ERR_IO") == 0);
    CHECK(strcmp(ddim_status_name(DDIM_ERR_INTERNAL), "DDIM_ERR_INTERNAL") == 0);
    CHECK(strcmp(ddim_status_name((ddim_status)99), "DDIM_ERR_UNKNOWN") == 0);
    CHECK(ddim_cuda_device_count() >= 0);
  }

  /* ---- loading: every failure names the problem and leaves *out NULL */
  FAILS(DDIM_ERR_IO, "/nonexistent/dir/model.ddim", ddim_model_load("/nonexistent/dir/model.ddim", &model));
  CHECK(model == NULL);
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "path is NULL", ddim_model_load(NULL, &model));
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "out is NULL", ddim_model_load(model_path, NULL));
  {
    unsigned char junk[64];
    memset(junk, 0xff, sizeof junk);
    snprintf(path, sizeof path, "%s/junk.ddim", work_dir);
    write_file(path, junk, sizeof junk);
    FAILS(DDIM_ERR_INVALID_FILE, "", ddim_model_load(path, &bad));
    CHECK(bad == NULL && strlen(ddim_last_error()) > 0);
    FAILS(DDIM_ERR_INVALID_FILE, "", ddim_model_load_memory(junk, sizeof junk, &bad));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "bytes is NULL", ddim_model_load_memory(NULL, 10, &bad));
  }
  OK(ddim_model_load(model_path, &model));
  CHECK(strcmp(ddim_last_error(), "") == 0); /* success clears the message */
  {
    size_t size;
    void* bytes = read_file(model_path, &size);
    OK(ddim_model_load_memory(bytes, size, &model2));
    free(bytes); /* the model copied what it needs */
  }
  OK(ddim_model_load(t20_path, &t20));

  /* ---- the last error is per thread */
  {
    pthread_t thread;
    thread_result r;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "path is NULL", ddim_model_load(NULL, &bad));
    pthread_create(&thread, NULL, failing_thread, &r);
    pthread_join(thread, NULL);
    CHECK(r.status == DDIM_ERR_IO && strstr(r.message, "/nonexistent/dir/model.ddim") != NULL);
    CHECK(strstr(ddim_last_error(), "path is NULL") != NULL);
  }

  /* ---- model info, summary, schedule */
  memset(&info, 0, sizeof info);
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "struct_size is 0", ddim_model_get_info(model, &info));
  info.struct_size = sizeof info;
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "model is NULL", ddim_model_get_info(NULL, &info));
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "info is NULL", ddim_model_get_info(model, NULL));
  OK(ddim_model_get_info(model, &info));
  CHECK(info.struct_size == sizeof info);
  CHECK(info.format_version >= 1);
  CHECK(info.in_channels == 1 && info.out_channels == 1 && info.height == 32 && info.width == 32);
  CHECK(info.parameter_count > 100000 && info.node_count > 10);
  {
    /* A caller built against an older, shorter struct: only the fields that fit are written. */
    ddim_model_info old;
    memset(&old, 0x7b, sizeof old);
    old.struct_size = offsetof(ddim_model_info, out_channels);
    OK(ddim_model_get_info(model, &old));
    CHECK(old.format_version == info.format_version && old.in_channels == info.in_channels);
    CHECK(old.out_channels == 0x7b7b7b7b && old.height == 0x7b7b7b7b);
  }
  {
    size_t length = 0;
    char small[16];
    char* full;
    OK(ddim_model_get_summary(model, NULL, 0, &length));
    CHECK(length > 100);
    full = (char*)malloc(length + 1);
    OK(ddim_model_get_summary(model, full, length + 1, NULL));
    CHECK(strlen(full) == length);
    OK(ddim_model_get_summary(model, small, sizeof small, &length));
    CHECK(strlen(small) == sizeof small - 1 && strncmp(small, full, sizeof small - 1) == 0);
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "buffer is NULL", ddim_model_get_summary(model, NULL, 5, NULL));
    free(full);
  }
  ddim_schedule_init(&schedule);
  CHECK(schedule.num_train_timesteps == 1000 && schedule.prediction_type == DDIM_PREDICT_EPSILON);
  OK(ddim_model_get_schedule(model, &schedule));
  CHECK(schedule.num_train_timesteps == 1000 && schedule.beta_schedule == DDIM_BETA_LINEAR);
  CHECK(schedule.clip_sample == 1 && schedule.set_alpha_to_one == 1 && schedule.timestep_spacing == DDIM_SPACING_LEADING);
  CHECK(schedule.variance_type == DDIM_VARIANCE_FIXED_SMALL);

  /* ---- sessions: bad options, then the default CPU session */
  ddim_session_options_init(&so);
  CHECK(so.struct_size == sizeof so && so.batch == 1 && so.backend == DDIM_BACKEND_AUTO);
  so.backend = 7;
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "options.backend", ddim_session_create(model, &so, &session));
  CHECK(session == NULL);
  so.backend = DDIM_BACKEND_CPU;
  so.precision = -2;
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "options.precision", ddim_session_create(model, &so, &session));
  so.precision = DDIM_PRECISION_AUTO;
  so.batch = 0;
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "batch", ddim_session_create(model, &so, &session));
  so.batch = 70000;
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "batch", ddim_session_create(model, &so, &session));
  so.batch = 3;
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "model is NULL", ddim_session_create(NULL, &so, &session));
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "out is NULL", ddim_session_create(model, &so, NULL));
  if (ddim_cuda_device_count() == 0) {
    ddim_session_options cuda = so;
    cuda.backend = DDIM_BACKEND_CUDA;
    CHECK(ddim_session_create(model, &cuda, &session) != DDIM_OK && session == NULL && strlen(ddim_last_error()) > 0);
  }
  OK(ddim_session_create(model, &so, &session));
  /* The session holds the model: the caller's references may go now. */
  ddim_model_release(ddim_model_retain(model));
  OK(ddim_session_create(model2, NULL, &lone));
  ddim_model_release(model2);
  model2 = NULL;

  OK(ddim_session_get_shape(session, &n, &c, &h, &w, &out_c));
  CHECK(n == 3 && c == 1 && h == 32 && w == 32 && out_c == 1);
  OK(ddim_session_get_shape(session, NULL, NULL, NULL, NULL, NULL));
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "session is NULL", ddim_session_get_shape(NULL, &n, &c, &h, &w, &out_c));
  OK(ddim_session_get_backend(session, &backend));
  CHECK(backend == DDIM_BACKEND_CPU);
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "backend is NULL", ddim_session_get_backend(session, NULL));
  memset(&plan, 0, sizeof plan);
  plan.struct_size = sizeof plan;
  OK(ddim_session_get_plan_info(session, &plan));
  CHECK(strncmp(plan.backend, "cpu", 3) == 0 && strcmp(plan.precision, "fp32") == 0);
  CHECK(plan.batch == 3 && plan.height == 32 && plan.width == 32);
  CHECK(plan.weight_bytes > 0 && plan.arena_bytes > 0 && plan.arena_bytes <= plan.unplanned_bytes && plan.forward_flops > 0);
  CHECK(plan.fallback != NULL);
  for (i = 0; i < plan.fusion_count; ++i) CHECK(plan.fusions[i] != NULL && strlen(plan.fusions[i]) > 0);
  for (i = 0; i < plan.folded_node_count; ++i) CHECK(plan.folded_nodes[i] != NULL);
  for (i = 0; i < plan.warning_count; ++i) CHECK(plan.warnings[i] != NULL);
  E = (size_t)c * (size_t)h * (size_t)w;

  /* ---- the timestep plan */
  ddim_sample_options_init(&o);
  CHECK(o.struct_size == sizeof o && o.steps == 50 && o.spacing == DDIM_SPACING_DEFAULT && o.steps_offset == -1);
  o.steps = 6;
  OK(ddim_session_timesteps(session, &o, NULL, 0, &S));
  CHECK(S == 6);
  OK(ddim_session_timesteps(session, &o, timesteps, 64, &S));
  CHECK(S == 6 && timesteps[0] == 830 && timesteps[5] == 0); /* leading: 166 * (5 .. 0), offset 0 */
  timesteps[2] = -7;
  OK(ddim_session_timesteps(session, &o, timesteps, 2, &S));
  CHECK(S == 6 && timesteps[2] == -7); /* a short buffer is written up to its capacity only */
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "timesteps is NULL", ddim_session_timesteps(session, &o, NULL, 3, &S));
  o.spacing = DDIM_SPACING_UNIFORM;
  o.steps = 7;
  OK(ddim_session_timesteps(session, &o, timesteps, 64, &S));
  CHECK(S >= 1);
  o.spacing = 42;
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "options.spacing", ddim_session_timesteps(session, &o, timesteps, 64, &S));
  ddim_sample_options_init(&o);
  o.steps = 0;
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "steps", ddim_session_timesteps(session, &o, timesteps, 64, &S));

  /* ---- sampling: per-sample seeds, trajectory and x0, bitwise equal to `ddim sample` */
  ref_sample = read_npy(ref_dir, "sample.npy");
  ref_trajectory = read_npy(ref_dir, "trajectory.npy");
  ref_x0 = read_npy(ref_dir, "x0.npy");
  ddim_sample_options_init(&o);
  o.steps = 6;
  o.eta = 0.5;
  o.seeds = seeds;
  o.seed_count = 3;
  images = (float*)calloc(3 * E, sizeof(float));
  trajectory = (float*)calloc(7 * 3 * E, sizeof(float));
  x0 = (float*)calloc(6 * 3 * E, sizeof(float));
  one = (float*)calloc(E, sizeof(float));
  o.trajectory = trajectory;
  o.trajectory_count = 7 * 3 * E;
  o.x0 = x0;
  o.x0_count = 6 * 3 * E;
  {
    progress_state p = {0, 0, 0, 0};
    o.progress = on_progress;
    o.progress_user = &p;
    OK(ddim_session_sample(session, &o, images, 3 * E));
    CHECK(p.calls == 6 && p.last_done == 6 && p.last_total == 6);
  }
  CHECK(same_bits(images, 3 * E, ref_sample));
  CHECK(same_bits(trajectory, 7 * 3 * E, ref_trajectory));
  CHECK(same_bits(x0, 6 * 3 * E, ref_x0));
  /* A sample depends on its own seed only: each equals a lone sample with that seed. */
  for (i = 0; i < 3; ++i) {
    ddim_sample_options lone_options;
    ddim_sample_options_init(&lone_options);
    lone_options.steps = 6;
    lone_options.eta = 0.5;
    lone_options.seed = seeds[i];
    OK(ddim_session_sample(lone, &lone_options, one, E));
    CHECK(memcmp(one, images + i * E, E * sizeof(float)) == 0);
  }
  /* ... and starts from ddim_initial_noise(seed). */
  OK(ddim_initial_noise(seeds[1], one, E));
  CHECK(memcmp(one, trajectory + E, E * sizeof(float)) == 0);
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "out is NULL", ddim_initial_noise(1, NULL, E));
  FAILS(DDIM_ERR_INVALID_ARGUMENT, "count", ddim_initial_noise(1, one, 0));
  /* x_T given on the host: the trajectory's first slice reproduces the sample. */
  {
    ddim_sample_options from_x_T;
    float* again = (float*)calloc(3 * E, sizeof(float));
    ddim_sample_options_init(&from_x_T);
    from_x_T.steps = 6;
    from_x_T.eta = 0.5;
    from_x_T.seeds = seeds;
    from_x_T.seed_count = 3;
    from_x_T.x_T = trajectory;
    from_x_T.x_T_count = 3 * E;
    OK(ddim_session_sample(session, &from_x_T, again, 3 * E));
    CHECK(memcmp(again, images, 3 * E * sizeof(float)) == 0);
    from_x_T.x_T_count = 3 * E - 1;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "x_T", ddim_session_sample(session, &from_x_T, again, 3 * E));
    from_x_T.x_T_count = 0;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "options.x_T is given with a count of 0", ddim_session_sample(session, &from_x_T, again, 3 * E));
    /* Caller noise at eta 0 is refused (no noise is added there). */
    ddim_sample_options_init(&from_x_T);
    from_x_T.steps = 6;
    from_x_T.noise = x0;
    from_x_T.noise_count = 6 * 3 * E;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "eta = 0", ddim_session_sample(session, &from_x_T, again, 3 * E));
    free(again);
  }

  /* ---- sampling: every buffer checked before any work */
  {
    progress_state p = {0, 0, 0, 0};
    o.progress = on_progress;
    o.progress_user = &p;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "images holds", ddim_session_sample(session, &o, images, 3 * E - 1));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "images is NULL", ddim_session_sample(session, &o, NULL, 3 * E));
    o.trajectory_count = 6 * 3 * E;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "options.trajectory holds", ddim_session_sample(session, &o, images, 3 * E));
    o.trajectory_count = 7 * 3 * E;
    o.x0 = NULL;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "options.x0 is NULL", ddim_session_sample(session, &o, images, 3 * E));
    o.x0 = x0;
    o.seed_count = 2;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "seeds", ddim_session_sample(session, &o, images, 3 * E));
    o.seed_count = 3;
    o.clip_sample = 5;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "options.clip_sample", ddim_session_sample(session, &o, images, 3 * E));
    o.clip_sample = DDIM_DEFAULT;
    o.output_type = 9;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "options.output_type", ddim_session_sample(session, &o, images, 3 * E));
    o.output_type = DDIM_OUTPUT_FLOAT32;
    o.eta = -1;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "eta", ddim_session_sample(session, &o, images, 3 * E));
    o.eta = 0.5;
    CHECK(p.calls == 0); /* nothing ran */
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "session is NULL", ddim_session_sample(NULL, &o, images, 3 * E));
    /* Cancel from the callback: the call stops at the step boundary. */
    p.cancel_at = 2;
    FAILS(DDIM_ERR_CANCELLED, "", ddim_session_sample(session, &o, images, 3 * E));
    CHECK(p.calls == 2 && p.last_done == 2);
    /* The session is still usable after a cancel. */
    o.progress = NULL;
    OK(ddim_session_sample(session, &o, images, 3 * E));
    CHECK(same_bits(images, 3 * E, ref_sample));
  }

  /* ---- struct_size: older and newer callers */
  {
    struct newer {
      ddim_sample_options base;
      uint64_t future_field;
    } big;
    ddim_sample_options_init(&big.base);
    big.base.struct_size = sizeof big;
    big.base.steps = 6;
    big.base.eta = 0.5;
    big.base.seeds = seeds;
    big.base.seed_count = 3;
    big.future_field = 0;
    OK(ddim_session_sample(session, &big.base, images, 3 * E));
    CHECK(same_bits(images, 3 * E, ref_sample));
    big.future_field = 1;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "newer ddim.h", ddim_session_sample(session, &big.base, images, 3 * E));
    /* An older caller that knew fields up to eta only: the rest are the defaults (seed 0). */
    ddim_sample_options_init(&o);
    o.steps = 6;
    o.eta = 0.5;
    o.seed = 12345; /* beyond struct_size: not read */
    o.struct_size = offsetof(ddim_sample_options, seed);
    OK(ddim_session_sample(lone, &o, one, E));
    {
      float* seed0 = (float*)calloc(E, sizeof(float));
      ddim_sample_options_init(&o);
      o.steps = 6;
      o.eta = 0.5;
      OK(ddim_session_sample(lone, &o, seed0, E));
      CHECK(memcmp(one, seed0, E * sizeof(float)) == 0);
      free(seed0);
    }
    o.struct_size = 0;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "struct_size is 0", ddim_session_sample(lone, &o, one, E));
    o.struct_size = 3;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "struct_size", ddim_session_sample(lone, &o, one, E));
    o.struct_size = (size_t)1 << 40;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "struct_size", ddim_session_sample(lone, &o, one, E));
    /* NULL options: the defaults (50 steps). */
    OK(ddim_session_sample(lone, NULL, one, E));
  }

  /* ---- the CUDA-only calls on a CPU session */
  {
    float device_like[4];
    ddim_sample_options_init(&o);
    o.steps = 2;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "CPU", ddim_session_set_stream(session, NULL));
    o.output_device = device_like;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "CUDA", ddim_session_sample_async(session, &o));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "CUDA", ddim_session_sample(session, &o, NULL, 0));
    o.output_device = NULL;
    o.x_T_device = device_like;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "CUDA", ddim_session_sample(session, &o, images, 3 * E));
    o.x_T_device = NULL;
    o.progress = on_progress;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "progress", ddim_session_sample_async(session, &o));
  }

  /* ---- DDPM on the 20-timestep model, bitwise equal to `ddim sample --sampler ddpm` */
  {
    array ref_ddpm = read_npy(ref_dir, "ddpm.npy");
    ddim_ddpm_options d;
    ddim_session_options dso;
    float *out, *traj;
    size_t DE;
    int dc = 0, dh = 0, dw = 0;
    progress_state p = {0, 0, 0, 0};
    ddim_session_options_init(&dso);
    dso.backend = DDIM_BACKEND_CPU;
    dso.batch = 2;
    OK(ddim_session_create(t20, &dso, &ddpm_session));
    OK(ddim_session_get_shape(ddpm_session, NULL, &dc, &dh, &dw, NULL));
    DE = (size_t)dc * (size_t)dh * (size_t)dw;
    out = (float*)calloc(2 * DE, sizeof(float));
    traj = (float*)calloc(21 * 2 * DE, sizeof(float));
    ddim_ddpm_options_init(&d);
    CHECK(d.struct_size == sizeof d && d.variance == DDIM_VARIANCE_DEFAULT && d.clip_sample == DDIM_DEFAULT);
    d.seed = 4;
    d.trajectory = traj;
    d.trajectory_count = 21 * 2 * DE;
    d.progress = on_progress;
    d.progress_user = &p;
    OK(ddim_session_sample_ddpm(ddpm_session, &d, out, 2 * DE));
    CHECK(same_bits(out, 2 * DE, ref_ddpm));
    CHECK(memcmp(traj + 20 * 2 * DE, out, 2 * DE * sizeof(float)) == 0);
    CHECK(p.calls == 20 && p.last_total == 20);
    d.trajectory_count = 20 * 2 * DE;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "options.trajectory holds", ddim_session_sample_ddpm(ddpm_session, &d, out, 2 * DE));
    d.trajectory = NULL;
    d.trajectory_count = 0;
    d.variance = DDIM_VARIANCE_LEARNED;
    FAILS(DDIM_ERR_UNSUPPORTED, "", ddim_session_sample_ddpm(ddpm_session, &d, out, 2 * DE));
    d.variance = 17;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "options.variance", ddim_session_sample_ddpm(ddpm_session, &d, out, 2 * DE));
    d.variance = DDIM_VARIANCE_DEFAULT;
    p.calls = 0;
    p.cancel_at = 3;
    FAILS(DDIM_ERR_CANCELLED, "", ddim_session_sample_ddpm(ddpm_session, &d, out, 2 * DE));
    CHECK(p.calls == 3);
    free(out);
    free(traj);
    free(ref_ddpm.data);
  }

  /* ---- inversion, bitwise equal to `ddim invert` */
  {
    array ref_invert = read_npy(ref_dir, "invert.npy");
    array ref_invert_trajectory = read_npy(ref_dir, "invert_trajectory.npy");
    ddim_invert_options io;
    float* x_T = (float*)calloc(3 * E, sizeof(float));
    float* traj = (float*)calloc(6 * 3 * E, sizeof(float));
    progress_state p = {0, 0, 0, 0};
    ddim_invert_options_init(&io);
    CHECK(io.struct_size == sizeof io && io.steps == 50 && io.model_time == DDIM_MODEL_TIME_CURRENT && io.refine == 0);
    io.steps = 5;
    io.trajectory = traj;
    io.trajectory_count = 6 * 3 * E;
    io.progress = on_progress;
    io.progress_user = &p;
    OK(ddim_session_invert(session, ref_sample.data, 3 * E, &io, x_T, 3 * E));
    CHECK(same_bits(x_T, 3 * E, ref_invert));
    CHECK(same_bits(traj, 6 * 3 * E, ref_invert_trajectory));
    CHECK(p.calls == 5);
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "x0", ddim_session_invert(session, ref_sample.data, 3 * E - 3, &io, x_T, 3 * E));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "x_T holds", ddim_session_invert(session, ref_sample.data, 3 * E, &io, x_T, 2));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "x0 is NULL", ddim_session_invert(session, NULL, 3 * E, &io, x_T, 3 * E));
    io.model_time = 4;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "options.model_time", ddim_session_invert(session, ref_sample.data, 3 * E, &io, x_T, 3 * E));
    io.model_time = DDIM_MODEL_TIME_NEXT;
    io.refine = 2; /* refinement is for model time CURRENT only */
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "refine", ddim_session_invert(session, ref_sample.data, 3 * E, &io, x_T, 3 * E));
    io.refine = 0;
    io.trajectory = NULL;
    io.trajectory_count = 0;
    p.calls = 0;
    p.cancel_at = 1;
    FAILS(DDIM_ERR_CANCELLED, "", ddim_session_invert(session, ref_sample.data, 3 * E, &io, x_T, 3 * E));
    CHECK(p.calls == 1);
    free(x_T);
    free(traj);
    free(ref_invert.data);
    free(ref_invert_trajectory.data);
  }

  /* ---- one forward pass, bitwise equal to `ddim forward`, with per-node dumps */
  {
    array ref_forward = read_npy(ref_dir, "forward.npy");
    float* out = (float*)calloc(3 * (size_t)out_c * (size_t)h * (size_t)w, sizeof(float));
    const size_t out_count = 3 * (size_t)out_c * (size_t)h * (size_t)w;
    int t = 500;
    int per_sample[3] = {500, 500, 500};
    dump_state d;
    memset(&d, 0, sizeof d);
    OK(ddim_session_forward(session, ref_sample.data, 3 * E, &t, 1, out, out_count, NULL, NULL));
    CHECK(same_bits(out, out_count, ref_forward));
    memset(out, 0, out_count * sizeof(float));
    OK(ddim_session_forward(session, ref_sample.data, 3 * E, per_sample, 3, out, out_count, on_node, &d));
    CHECK(same_bits(out, out_count, ref_forward));
    CHECK(d.nodes > 10 && d.bad_shapes == 0 && d.last_count == out_count);
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "out holds", ddim_session_forward(session, ref_sample.data, 3 * E, &t, 1, out, 5, NULL, NULL));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "t is NULL", ddim_session_forward(session, ref_sample.data, 3 * E, NULL, 1, out, out_count, NULL, NULL));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "", ddim_session_forward(session, ref_sample.data, 3 * E, per_sample, 2, out, out_count, NULL, NULL));
    free(out);
    free(ref_forward.data);
  }

  /* ---- sessions of one model on several threads at once */
  {
    pthread_t threads[2];
    sample_job jobs[2];
    for (i = 0; i < 2; ++i) {
      jobs[i].model = model;
      jobs[i].seed = seeds[i];
      jobs[i].images = (float*)calloc(E, sizeof(float));
      jobs[i].count = E;
      pthread_create(&threads[i], NULL, sampling_thread, &jobs[i]);
    }
    for (i = 0; i < 2; ++i) {
      pthread_join(threads[i], NULL);
      CHECK(jobs[i].status == DDIM_OK);
      CHECK(memcmp(jobs[i].images, ref_sample.data + i * E, E * sizeof(float)) == 0);
      free(jobs[i].images);
    }
  }

  /* ---- the scheduler alone */
  {
    ddim_schedule bad_schedule;
    ddim_step_options so2;
    ddim_step_coefficients k;
    float model_output[8], sample[8], prev[8], noise[8], px0[8];
    double a_t, a_prev;
    int j;
    ddim_schedule_init(&bad_schedule);
    bad_schedule.num_train_timesteps = 0;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "num_train_timesteps", ddim_scheduler_create(&bad_schedule, &scheduler));
    CHECK(scheduler == NULL);
    bad_schedule.num_train_timesteps = 1000;
    bad_schedule.beta_schedule = 9;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "schedule.beta_schedule", ddim_scheduler_create(&bad_schedule, &scheduler));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "schedule is NULL", ddim_scheduler_create(NULL, &scheduler));
    OK(ddim_scheduler_create(&schedule, &scheduler)); /* the model's schedule */
    OK(ddim_scheduler_timesteps(scheduler, 6, DDIM_SPACING_DEFAULT, -1, timesteps, 64, &S));
    CHECK(S == 6 && timesteps[0] == 830 && timesteps[5] == 0);
    OK(ddim_scheduler_timesteps(scheduler, 10, DDIM_SPACING_TRAILING, -1, timesteps, 64, &S));
    CHECK(S == 10 && timesteps[0] == 999 && timesteps[9] == 99);
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "", ddim_scheduler_timesteps(scheduler, 0, DDIM_SPACING_DEFAULT, -1, timesteps, 64, &S));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "steps_offset", ddim_scheduler_timesteps(scheduler, 5, DDIM_SPACING_DEFAULT, -3, timesteps, 64, &S));

    ddim_step_options_init(&so2);
    CHECK(so2.struct_size == sizeof so2 && so2.eta == 0 && so2.clip_sample == DDIM_DEFAULT);
    k.struct_size = sizeof k;
    OK(ddim_scheduler_step_coefficients(scheduler, 500, 250, &so2, &k));
    CHECK(k.t == 500 && k.t_prev == 250 && k.sigma == 0);
    /* alpha-bar from the linear betas, in double */
    a_t = 1;
    a_prev = 1;
    for (j = 0; j <= 500; ++j) {
      const double beta = 0.0001 + (0.02 - 0.0001) * j / 999.0;
      a_t *= 1 - beta;
      if (j <= 250) a_prev *= 1 - beta;
    }
    CHECK(fabs(k.alpha_t - a_t) < 1e-12 && fabs(k.alpha_prev - a_prev) < 1e-12);
    CHECK(fabs(k.dir - sqrt(1 - a_prev)) < 1e-12);
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "", ddim_scheduler_step_coefficients(scheduler, 1000, 250, NULL, &k));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "out is NULL", ddim_scheduler_step_coefficients(scheduler, 500, 250, NULL, NULL));

    /* One step on caller arrays: the DDIM update, eta 0, no clipping. */
    for (j = 0; j < 8; ++j) {
      model_output[j] = 0.1f * (float)(j - 4);
      sample[j] = 0.05f * (float)j - 0.2f;
    }
    so2.clip_sample = DDIM_OFF;
    OK(ddim_scheduler_step(scheduler, model_output, 500, 250, sample, prev, 2, 4, &so2, NULL, px0));
    for (j = 0; j < 8; ++j) {
      const double x0j = (sample[j] - sqrt(1 - a_t) * model_output[j]) / sqrt(a_t);
      const double want = sqrt(a_prev) * x0j + sqrt(1 - a_prev) * model_output[j];
      CHECK(fabs(prev[j] - want) < 1e-5 && fabs(px0[j] - x0j) < 1e-5);
    }
    so2.eta = 1.0;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "noise", ddim_scheduler_step(scheduler, model_output, 500, 250, sample, prev, 2, 4, &so2, NULL, NULL));
    for (j = 0; j < 8; ++j) noise[j] = 1.0f;
    OK(ddim_scheduler_step(scheduler, model_output, 500, 250, sample, prev, 2, 4, &so2, noise, NULL));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "sample is NULL", ddim_scheduler_step(scheduler, model_output, 500, 250, NULL, prev, 2, 4, &so2, noise, NULL));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "at least 1", ddim_scheduler_step(scheduler, model_output, 500, 250, sample, prev, 0, 4, &so2, noise, NULL));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "scheduler is NULL", ddim_scheduler_step(NULL, model_output, 500, 250, sample, prev, 2, 4, &so2, noise, NULL));
    ddim_scheduler_release(scheduler);
    ddim_scheduler_release(NULL);
  }

  /* ---- slerp */
  {
    float a[4] = {1, 0, 0, 0}, b[4] = {0, 1, 0, 0}, out[4];
    OK(ddim_slerp(a, b, 4, 0.0, out));
    CHECK(memcmp(out, a, sizeof a) == 0);
    OK(ddim_slerp(a, b, 4, 1.0, out));
    CHECK(memcmp(out, b, sizeof b) == 0);
    OK(ddim_slerp(a, b, 4, 0.5, out));
    CHECK(fabs(out[0] - sqrt(0.5)) < 1e-6 && fabs(out[1] - sqrt(0.5)) < 1e-6 && out[2] == 0);
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "", ddim_slerp(a, b, 4, 1.5, out));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "", ddim_slerp(a, b, 0, 0.5, out));
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "a is NULL", ddim_slerp(NULL, b, 4, 0.5, out));
  }

  /* ---- class-conditional models: labels and guidance through ddim_class_conditioning, bitwise
     against the ddim tool (ref/cc_sample.npy, ref/cc_forward.npy from run_c_test.cmake) */
  if (argc >= 6) {
    ddim_model* cc = NULL;
    ddim_session* cs = NULL;
    ddim_model_info ci;
    ddim_class_conditioning cond;
    double labels[2] = {3, 7};
    uint64_t cc_seeds[2] = {9, 2};
    int t500 = 500;
    size_t CE;
    float *cc_images, *cc_out;
    array ref_cc = read_npy(ref_dir, "cc_sample.npy"), ref_ccf = read_npy(ref_dir, "cc_forward.npy");
    OK(ddim_model_load(argv[5], &cc));
    memset(&ci, 0, sizeof ci);
    ci.struct_size = sizeof ci;
    OK(ddim_model_get_info(cc, &ci));
    CHECK(ci.format_version == 2 && ci.class_kind == DDIM_CLASS_INDEX && ci.num_classes == 10 && ci.class_dim == 1 &&
          ci.has_null == 1);
    ddim_session_options_init(&so);
    so.backend = DDIM_BACKEND_CPU;
    so.batch = 2;
    so.threads = 1;
    OK(ddim_session_create(cc, &so, &cs));
    {
      ddim_plan_info pi;
      size_t k;
      int has_add = 0;
      memset(&pi, 0, sizeof pi);
      pi.struct_size = sizeof pi;
      OK(ddim_session_get_plan_info(cs, &pi));
      CHECK(pi.forward_batch == 4 && pi.folded_per_label_count > 0);
      for (k = 0; k < pi.folded_per_label_count; ++k) has_add |= strcmp(pi.folded_per_label[k], "class_embedding.add") == 0;
      CHECK(has_add);
    }
    CE = (size_t)ci.in_channels * (size_t)ci.height * (size_t)ci.width;
    cc_images = (float*)malloc(2 * CE * sizeof(float));
    cc_out = (float*)malloc(2 * CE * sizeof(float));
    ddim_class_conditioning_init(&cond);
    CHECK(cond.guidance_scale == 1.0 && cond.guidance_rescale == 0.0);
    cond.class_labels = labels;
    cond.class_label_count = 2;
    cond.guidance_scale = 2.5;
    ddim_sample_options_init(&o);
    o.steps = 4;
    o.seeds = cc_seeds;
    o.seed_count = 2;
    o.conditioning = &cond;
    OK(ddim_session_sample(cs, &o, cc_images, 2 * CE));
    CHECK(same_bits(cc_images, 2 * CE, ref_cc));
    OK(ddim_session_forward_conditioned(cs, ref_cc.data, 2 * CE, &t500, 1, &cond, cc_out, 2 * CE, NULL, NULL));
    CHECK(same_bits(cc_out, 2 * CE, ref_ccf));
    /* errors: no labels for a conditional model; an out-of-range label; labels for an unconditional one */
    o.conditioning = NULL;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "give class labels", ddim_session_sample(cs, &o, cc_images, 2 * CE));
    labels[1] = 10;
    o.conditioning = &cond;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "is not an integer in [0, 10)", ddim_session_sample(cs, &o, cc_images, 2 * CE));
    labels[1] = 7;
    cond.struct_size = 0;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "struct_size is 0", ddim_session_sample(cs, &o, cc_images, 2 * CE));
    ddim_class_conditioning_init(&cond);
    cond.class_labels = labels;
    cond.class_label_count = 1;
    ddim_sample_options_init(&o);
    o.steps = 2;
    o.conditioning = &cond;
    FAILS(DDIM_ERR_INVALID_ARGUMENT, "the model is unconditional", ddim_session_sample(session, &o, images, 3 * E));
    ddim_session_release(cs);
    ddim_model_release(cc);
    free(cc_images);
    free(cc_out);
    free(ref_cc.data);
    free(ref_ccf.data);
  }

  /* ---- release: sessions outlive the caller's model references */
  ddim_model_release(model); /* the session still holds it */
  model = NULL;
  ddim_sample_options_init(&o);
  o.steps = 6;
  o.eta = 0.5;
  o.seeds = seeds;
  o.seed_count = 3;
  OK(ddim_session_sample(session, &o, images, 3 * E));
  CHECK(same_bits(images, 3 * E, ref_sample));
  ddim_session_release(session);
  ddim_session_release(lone);
  ddim_session_release(ddpm_session);
  ddim_session_release(NULL);
  /* ---- latent models (ref/latent_sample.npy from run_c_test.cmake) */
  if (argc == 7) test_latent(argv[6], ref_dir, t20);
  ddim_model_release(t20);
  ddim_model_release(NULL);
  CHECK(ddim_model_retain(NULL) == NULL);

  free(images);
  free(trajectory);
  free(x0);
  free(one);
  free(ref_sample.data);
  free(ref_trajectory.data);
  free(ref_x0.data);
  if (g_failures) {
    fprintf(stderr, "c_api_test: %d of %d checks failed\n", g_failures, g_checks);
    return 1;
  }
  printf("c_api_test: all %d checks passed\n", g_checks);
  return 0;
}
