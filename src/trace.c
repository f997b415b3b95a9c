/* trace.c: the trace timeline (docs/trace.md). While a trace runs, every
 * context of the process (the home loop, each thread worker, each on its own
 * OS thread and lua_State) adds events here: slices of tasks and calls, and
 * flow arrows between them. They are kept in memory, preformatted, under one
 * mutex, and written at stop as a Chrome trace-event file (JSON: Perfetto
 * and chrome://tracing open it).
 *
 * The lowest layer: it calls no other file of src/. Timestamps are
 * uv_hrtime (monotonic, the same clock in every thread and process) in
 * microseconds since the start. Off, it costs its callers one relaxed load
 * (corral__trace_on); the Lua half checks a flag of its own first. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define MAX_BYTES ((size_t)512 << 20) /* events kept at most; the rest are counted, dropped */
#define ID_BASE   ((uint64_t)1 << 50) /* ids not made of an address (above any user address) */
/* settle points kept at most (64 MiB of map): later unwraps have no arrow */
#define MAX_POINTS ((size_t)1 << 20)

typedef struct {
  uint64_t id; /* 0: empty */
  int tid;
  double ts;
  uint64_t flow; /* a WIRE entry's: the id of the flow into the child */
} settle_point;

/* Keys of the points map beside the settle points (keyed by the future's
 * id): where a process worker's call was sent, and the flow its proxy
 * handed it to the child with. */
#define SENT ((uint64_t)1 << 62)
#define WIRE ((uint64_t)1 << 61)

typedef struct {
  char *name;
  int used; /* has events in this trace */
} track;

static uv_once_t once = UV_ONCE_INIT;
static uv_mutex_t lock;
static atomic_int active;
static _Atomic(uint64_t) t0;
static atomic_ullong next_id;

/* under lock */
static FILE *out;
static char *out_path;
static atomic_long pid; /* (read without the lock when an event is formatted) */
static char *buf;
static size_t len, cap;
static long nevents, dropped;
static track *tracks;
static int ntracks;
static settle_point *points;
static size_t npoints, pcap;
static int exit_hooked;
/* Process workers: a child started while a trace runs records its own
 * events (child_mode) and writes them, at its end, to a fragment file its
 * parent named; the parent appends the fragments to its file at stop. */
static int child_mode;
static char **frags;
static int nfrags;

static void trace_init(void) {
  if (uv_mutex_init(&lock) != 0) abort();
}

int corral__trace_on(void) { return atomic_load_explicit(&active, memory_order_relaxed); }

double corral__trace_now(void) {
  return (double)(uv_hrtime() - atomic_load_explicit(&t0, memory_order_relaxed)) / 1e3;
}

uint64_t corral__trace_newid(void) {
  return ID_BASE + atomic_fetch_add_explicit(&next_id, 1, memory_order_relaxed) + 1;
}

/* ======================================================================== */
/* Events                                                                    */
/* ======================================================================== */

/* The length of the well-formed UTF-8 sequence at s (n bytes left) that
 * encodes a character past ASCII, or 0. */
static size_t utf8_len(const unsigned char *s, size_t n) {
  size_t len = s[0] >= 0xf0 ? 4 : s[0] >= 0xe0 ? 3 : 2;
  if (s[0] < 0xc2 || s[0] > 0xf4 || len > n) return 0;
  for (size_t i = 1; i < len; i++)
    if ((s[i] & 0xc0) != 0x80) return 0;
  if ((s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] > 0x9f) || /* overlong, surrogate */
      (s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] > 0x8f))
    return 0;
  return len;
}

/* s as the body of a JSON string, at most max bytes of it read: quotes,
 * backslashes and control characters escaped, UTF-8 kept as it is, and a
 * byte that is not part of well-formed UTF-8 escaped as \u00XX (a name
 * may hold any byte: the file stays valid JSON, and valid UTF-8). */
static size_t escape(char *dst, size_t room, const char *s, size_t n) {
  size_t o = 0;
  for (size_t i = 0; i < n && o + 7 < room; i++) {
    unsigned char c = (unsigned char)s[i];
    size_t u = c >= 0x80 ? utf8_len((const unsigned char *)s + i, n - i) : 0;
    if (u > 0) {
      memcpy(dst + o, s + i, u);
      o += u;
      i += u - 1;
    } else if (c == '"' || c == '\\') {
      dst[o++] = '\\';
      dst[o++] = (char)c;
    } else if (c < 0x20 || c >= 0x7f) {
      o += (size_t)snprintf(dst + o, room - o, "\\u%04x", c);
    } else {
      dst[o++] = (char)c;
    }
  }
  dst[o] = '\0';
  return o;
}

/* Append one event (its JSON object, n bytes) for track tid; under lock. */
static void add_locked(int tid, const char *ev, size_t n) {
  if (!atomic_load_explicit(&active, memory_order_relaxed)) return;
  if (len + n + 3 > cap) {
    size_t ncap = cap ? cap * 2 : 65536;
    while (ncap < len + n + 3)
      ncap *= 2;
    char *nb = ncap <= MAX_BYTES ? realloc(buf, ncap) : NULL;
    if (nb == NULL) {
      dropped++;
      return;
    }
    buf = nb;
    cap = ncap;
  }
  if (nevents > 0) {
    buf[len++] = ',';
    buf[len++] = '\n';
  }
  memcpy(buf + len, ev, n);
  len += n;
  nevents++;
  if (tid >= 1 && tid <= ntracks) tracks[tid - 1].used = 1;
}

static void add(int tid, const char *ev, int n) {
  if (n <= 0) return;
  uv_mutex_lock(&lock);
  add_locked(tid, ev, (size_t)n);
  uv_mutex_unlock(&lock);
}

void corral__trace_slice(int tid, const char *name, size_t nlen, const char *cat, double ts,
                         double dur, uint64_t id, long bytes) {
  if (!corral__trace_on()) return;
  char esc[512], ev[1024];
  escape(esc, sizeof esc, name, nlen);
  /* in whole nanoseconds, the end rounded as the start: a slice that ends
   * inside another in time ends inside it in the file too */
  if (ts < 0) ts = 0;
  long long t = llround(ts * 1e3), e = llround((ts + (dur < 0 ? 0 : dur)) * 1e3), d = e - t;
  int n = snprintf(ev, sizeof ev,
                   "{\"ph\":\"X\",\"name\":\"%s\",\"cat\":\"%s\",\"pid\":%ld,\"tid\":%d,"
                   "\"ts\":%lld.%03lld,\"dur\":%lld.%03lld,\"args\":{",
                   esc, cat, atomic_load_explicit(&pid, memory_order_relaxed), tid, t / 1000,
                   t % 1000, d / 1000, d % 1000);
  if (n < 0 || (size_t)n >= sizeof ev - 64) return;
  const char *sep = "";
  if (id != 0) {
    n += snprintf(ev + n, sizeof ev - (size_t)n, "\"id\":\"0x%" PRIx64 "\"", id);
    sep = ",";
  }
  if (bytes >= 0) n += snprintf(ev + n, sizeof ev - (size_t)n, "%s\"bytes\":%ld", sep, bytes);
  n += snprintf(ev + n, sizeof ev - (size_t)n, "}}");
  add(tid, ev, n);
}

static int flow_event(char *ev, size_t room, int tid, char ph, double ts, uint64_t id,
                      const char *name) {
  return snprintf(ev, room,
                  "{\"ph\":\"%c\",\"name\":\"%s\",\"cat\":\"flow\",\"id\":\"0x%" PRIx64
                  "\",\"pid\":%ld,\"tid\":%d,\"ts\":%.3f,\"bp\":\"e\"}",
                  ph, name, id, atomic_load_explicit(&pid, memory_order_relaxed), tid, ts);
}

void corral__trace_flow(int tid, char ph, double ts, uint64_t id, const char *name) {
  if (!corral__trace_on()) return;
  char ev[256];
  add(tid, ev, flow_event(ev, sizeof ev, tid, ph, ts, id, name));
}

/* ---- where futures settled: the starts of the unwrap flows ---------------- */

static settle_point *point_slot(uint64_t id) {
  size_t mask = pcap - 1, i = (size_t)((id * 0x9e3779b97f4a7c15ull) >> 20) & mask;
  while (points[i].id != 0 && points[i].id != id)
    i = (i + 1) & mask;
  return &points[i];
}

/* The entry of id, or NULL; under lock. */
static settle_point *point_get(uint64_t id) {
  settle_point *p = pcap ? point_slot(id) : NULL;
  return p != NULL && p->id == id ? p : NULL;
}

/* The entry of id, made if need be (NULL: no memory, or too many); under lock. */
static settle_point *point_put(uint64_t id) {
  if (npoints >= MAX_POINTS) return point_get(id);
  if ((npoints + 1) * 2 > pcap) {
    size_t ncap = pcap ? pcap * 2 : 1024;
    settle_point *np = calloc(ncap, sizeof *np), *old = points;
    size_t ocap = pcap;
    if (np == NULL) return NULL;
    points = np;
    pcap = ncap;
    for (size_t i = 0; i < ocap; i++)
      if (old[i].id != 0) *point_slot(old[i].id) = old[i];
    free(old);
  }
  settle_point *p = point_slot(id);
  if (p->id == 0) npoints++;
  p->id = id;
  return p;
}

void corral__trace_settled(uint64_t id, int tid, double ts) {
  if (!corral__trace_on() || id == 0) return;
  uv_mutex_lock(&lock);
  settle_point *p = point_put(id);
  if (p != NULL) {
    p->tid = tid;
    p->ts = ts;
  }
  uv_mutex_unlock(&lock);
}

int corral__trace_unwrap(uint64_t from, int tid, double ts) {
  if (!corral__trace_on() || from == 0) return 0;
  int found = 0;
  uv_mutex_lock(&lock);
  settle_point *p = point_get(from);
  if (p != NULL && p->ts <= ts) {
    char ev[256];
    uint64_t id = corral__trace_newid();
    int n = flow_event(ev, sizeof ev, p->tid, 's', p->ts, id, "unwrap");
    if (n > 0) add_locked(p->tid, ev, (size_t)n);
    n = flow_event(ev, sizeof ev, tid, 'f', ts, id, "unwrap");
    if (n > 0) add_locked(tid, ev, (size_t)n);
    found = 1;
  }
  uv_mutex_unlock(&lock);
  return found;
}

/* ======================================================================== */
/* Tracks                                                                    */
/* ======================================================================== */

int corral__trace_thread(const char *name) {
  uv_once(&once, trace_init);
  uv_mutex_lock(&lock);
  int tid = 0;
  track *nt = realloc(tracks, (size_t)(ntracks + 1) * sizeof *nt);
  char *copy = strdup(name);
  if (nt != NULL) tracks = nt;
  if (nt != NULL && copy != NULL) {
    tracks[ntracks].name = copy;
    tracks[ntracks].used = 0;
    tid = ++ntracks;
  } else {
    free(copy);
  }
  uv_mutex_unlock(&lock);
  return tid;
}

/* ======================================================================== */
/* Process workers                                                           */
/* ======================================================================== */

int corral__trace_child_env(char *buf, size_t n) {
  if (!corral__trace_on()) return 0;
  int rc = 0;
  uv_mutex_lock(&lock);
  if (!atomic_load(&active) || child_mode) goto done;
  char path[4096];
  if (snprintf(path, sizeof path, "%s.%ld.%d.part", out_path, pid, nfrags + 1) >= (int)sizeof path)
    goto done;
  char **nf = realloc(frags, (size_t)(nfrags + 1) * sizeof *nf);
  if (nf == NULL) goto done;
  frags = nf;
  FILE *f = fopen(path, "w"); /* (the child writes into it: it must exist) */
  if (f == NULL) goto done;
  fclose(f);
  if ((frags[nfrags] = strdup(path)) == NULL) {
    remove(path);
    goto done;
  }
  nfrags++;
  rc = snprintf(buf, n, "CORRAL_TRACE_CHILD=%" PRIu64 ":%s", atomic_load(&t0), path) < (int)n;
done:
  uv_mutex_unlock(&lock);
  return rc;
}

uint64_t corral__trace_wire_id(long child, uint64_t wire) {
  return ((uint64_t)1 << 51) + (((uint64_t)child & 0x3fffff) << 28) + (wire & 0xfffffff);
}

/* A process worker's call: the flow from where it was sent (sent: the
 * caller's track and time) to the child that runs it (the child's pid, the
 * call's number on the wire), drawn once both are known, whichever first. */
static void wire_flow(const settle_point *sent, uint64_t flow) {
  char ev[256];
  int n = flow_event(ev, sizeof ev, sent->tid, 's', sent->ts, flow, "call");
  if (n > 0) add_locked(sent->tid, ev, (size_t)n);
}

void corral__trace_sent(uint64_t id, int tid, double ts) {
  if (!corral__trace_on() || id == 0) return;
  uv_mutex_lock(&lock);
  settle_point *p = point_put(id ^ SENT);
  if (p != NULL) {
    p->tid = tid;
    p->ts = ts;
    settle_point *w = point_get(id ^ WIRE);
    if (w != NULL) wire_flow(p, w->flow);
  }
  uv_mutex_unlock(&lock);
}

void corral__trace_wire(const void *result, long child, uint64_t wire) {
  if (!corral__trace_on()) return;
  uint64_t id = (uint64_t)(uintptr_t)result, flow = corral__trace_wire_id(child, wire);
  uv_mutex_lock(&lock);
  settle_point *s = point_get(id ^ SENT);
  if (s != NULL) {
    wire_flow(s, flow);
  } else {
    settle_point *w = point_put(id ^ WIRE);
    if (w != NULL) w->flow = flow;
  }
  uv_mutex_unlock(&lock);
}

int corral__trace_start_child(const char *spec) {
  uv_once(&once, trace_init);
  char *colon = strchr(spec, ':');
  if (colon == NULL) return -1;
  uint64_t start = strtoull(spec, NULL, 10);
  FILE *f = fopen(colon + 1, "r"); /* (gone: the parent's trace has ended) */
  if (f == NULL) return -1;
  fclose(f);
  uv_mutex_lock(&lock);
  int rc = -1;
  if (atomic_load(&active) || (out_path = strdup(colon + 1)) == NULL) goto done;
  out = NULL; /* (written at stop, beside the fragment, then renamed over it) */
  child_mode = 1;
  pid = (long)getpid();
  len = 0;
  nevents = dropped = 0;
  atomic_store(&t0, start);
  atomic_store(&active, 1);
  rc = 0;
done:
  uv_mutex_unlock(&lock);
  return rc;
}

/* The fragments of the children: appended to the parent's file, then
 * removed. */
static void merge_fragments(FILE *f) {
  for (int i = 0; i < nfrags; i++) {
    FILE *in = f != NULL ? fopen(frags[i], "r") : NULL;
    if (in != NULL) {
      char chunk[65536];
      size_t n;
      while ((n = fread(chunk, 1, sizeof chunk, in)) > 0)
        fwrite(chunk, 1, n, f);
      fclose(in);
    }
    remove(frags[i]);
    free(frags[i]);
  }
  free(frags);
  frags = NULL;
  nfrags = 0;
}

/* ======================================================================== */
/* Start and stop                                                            */
/* ======================================================================== */

static void at_exit(void) {
  char err[256];
  long n;
  if (corral__trace_on() && corral__trace_stop(err, sizeof err, &n) < 0)
    fprintf(stderr, "corral: trace: %s\n", err);
}

int corral__trace_start(const char *path, char *err, size_t errlen) {
  uv_once(&once, trace_init);
  uv_mutex_lock(&lock);
  int rc = -1;
  if (atomic_load(&active)) {
    snprintf(err, errlen, "a trace is already being written (to %s)", out_path);
    goto done;
  }
  FILE *f = fopen(path, "w");
  if (f == NULL) {
    snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
    goto done;
  }
  char *p = strdup(path);
  if (p == NULL) {
    fclose(f);
    snprintf(err, errlen, "out of memory");
    goto done;
  }
  /* until stop writes it: a valid trace that says so (a process ended at
   * once, by a second Ctrl-C or SIGKILL, leaves this) */
  fputs("{\"traceEvents\":[],\"otherData\":{\"incomplete\":\"the process ended before the trace "
        "was written\"}}\n",
        f);
  fflush(f);
  out = f;
  out_path = p;
  pid = (long)getpid();
  len = 0;
  nevents = dropped = 0;
  npoints = 0;
  if (points != NULL) memset(points, 0, pcap * sizeof *points);
  for (int i = 0; i < ntracks; i++)
    tracks[i].used = 0;
  atomic_store(&t0, uv_hrtime());
  atomic_store(&active, 1);
  if (!exit_hooked) exit_hooked = atexit(at_exit) == 0;
  rc = 0;
done:
  uv_mutex_unlock(&lock);
  return rc;
}

static void meta(FILE *f, const char *what, int tid, const char *name) {
  char esc[512];
  escape(esc, sizeof esc, name, strlen(name));
  fprintf(
      f,
      "%s{\"ph\":\"M\",\"name\":\"%s\",\"pid\":%ld,\"tid\":%d,\"ts\":0,\"args\":{\"name\":\"%s\"}}",
      tid > 0 ? ",\n" : "", what, pid, tid, esc);
}

int corral__trace_stop(char *err, size_t errlen, long *count) {
  uv_once(&once, trace_init);
  uv_mutex_lock(&lock);
  int rc = 1;
  if (!atomic_load(&active)) goto done; /* none running: nothing to do */
  atomic_store(&active, 0);
  FILE *f = out;
  char tmp[4200];
  if (child_mode) {
    /* whole or not at all: the parent may read the fragment at any time */
    snprintf(tmp, sizeof tmp, "%s.w", out_path);
    if ((f = fopen(tmp, "w")) == NULL) {
      snprintf(err, errlen, "cannot open %s: %s", tmp, strerror(errno));
      rc = -1;
      goto end;
    }
  }
  if (child_mode) {
    /* a process worker's fragment: its events, each line starting with a
     * comma (the parent's file goes on after its own) */
    char name[600];
    snprintf(name, sizeof name, "corral %s (process %ld)",
             ntracks > 0 ? tracks[ntracks - 1].name : "worker", pid);
    fputs(",\n", f);
    meta(f, "process_name", 0, name);
  } else {
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && st.st_nlink == 0) { /* its directory went, or it */
      fclose(f);
      snprintf(err, errlen, "cannot write %s: it was removed while the trace ran", out_path);
      rc = -1;
      merge_fragments(NULL);
      goto end;
    }
    rewind(f); /* (over what start wrote) */
    if (ftruncate(fileno(f), 0) != 0) clearerr(f);
    fprintf(f, "{\"traceEvents\":[\n");
    meta(f, "process_name", 0, "corral");
  }
  for (int i = 0; i < ntracks; i++) {
    if (!tracks[i].used) continue;
    meta(f, "thread_name", i + 1, tracks[i].name);
    fprintf(f,
            ",\n{\"ph\":\"M\",\"name\":\"thread_sort_index\",\"pid\":%ld,\"tid\":%d,\"ts\":0,"
            "\"args\":{\"sort_index\":%d}}",
            pid, i + 1, i + 1);
  }
  if (len > 0) {
    fputs(",\n", f);
    fwrite(buf, 1, len, f);
  }
  if (!child_mode) {
    merge_fragments(f);
    fprintf(f, "\n],\"displayTimeUnit\":\"ms\",\"otherData\":{\"events\":%ld,\"dropped\":%ld}}\n",
            nevents, dropped);
  }
  int bad = ferror(f);
  if (fclose(f) != 0) bad = 1;
  if (bad) {
    snprintf(err, errlen, "cannot write %s: %s", out_path, strerror(errno));
    rc = -1;
  } else {
    rc = 0;
  }
  /* a fragment its parent removed already (its trace has ended) is not
   * made again */
  if (child_mode && (bad || access(out_path, F_OK) != 0 || rename(tmp, out_path) != 0)) remove(tmp);
end:
  *count = nevents;
  free(points); /* (the map of settle points is for a running trace only) */
  points = NULL;
  npoints = pcap = 0;
  out = NULL;
  free(out_path);
  out_path = NULL;
  free(buf);
  buf = NULL;
  len = cap = 0;
done:
  uv_mutex_unlock(&lock);
  return rc;
}
