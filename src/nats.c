/* nats.c: remote workers' bridge to a NATS server (libnats): connections,
 * the calls that wait for their replies, and mailboxes of received messages.
 *
 * No Lua here. libnats runs its own threads: a connection's reader and
 * flusher, and one delivery thread per asynchronous subscription. What
 * must not run on a loop thread (connecting, JetStream's API requests, a
 * pull consumer's Fetch) runs on a thread of the connection's own (its
 * lane: one job at a time) or of the mailbox (a pull mailbox fetches).
 * Results reach the loops the way every other thread's do: a future is
 * settled, and its watchers are woken.
 *
 * A call is published with a reply subject of its own, `<inbox>.<n>`, and
 * waits in the connection's table of pending calls under n. The reply's
 * subscription takes it out of the table and settles its future: a reply
 * that arrives twice (delivery is at least once) finds nothing the second
 * time and is dropped. Replies are bytes from outside the process: a
 * result must be one MessagePack array of plain values
 * (corral__codec_check_foreign), an error one array holding a map; other
 * bytes fail the call with a CodecError. They are decoded as foreign
 * bytes: no function, no handle, nothing that runs.
 *
 * Every connection is in a list: corral__nats_close_all closes a runtime's
 * when it closes; a Lua userdata only holds a counted reference.
 *
 * Lock order: list_lock, then a connection's lock, then a mailbox's lock. A
 * future is settled under none of them.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nats/nats.h>

#include "internal.h"

/* ======================================================================== */
/* The records                                                               */
/* ======================================================================== */

#define NBUCKETS 1024

typedef struct pending {
  struct pending *next;
  uint64_t n;
  corral_future *f; /* retained */
  char what[96];    /* what was called, for a no-responders error */
} pending;

typedef struct job job;

struct corral_nats {
  atomic_int refs;
  uv_mutex_t lock; /* all below but the lane's */
  natsConnection *nc;
  jsCtx *js;
  kvStore *kv;            /* the result bucket, bound on first use (the lane's only) */
  natsSubscription *rsub; /* replies: <inbox>.* */
  char inbox[64];
  char id[32]; /* the inbox's unique part: names call ids */
  uint64_t next;
  pending *buckets[NBUCKETS];
  int npending;
  int closed;
  queue mboxes; /* open mailboxes */
  queue node;   /* in `conns` */
  void *owner;  /* the runtime it belongs to */
  /* the lane: jobs run one at a time on `thread` (under lane_lock) */
  uv_mutex_t lane_lock;
  uv_cond_t lane_cond;
  job *jobs, **jobs_tail;
  job *later; /* jobs with a `due` time, in no order */
  int lane_quit, lane_started;
  uv_thread_t thread;
  atomic_int reconnects, disconnected;
};

struct corral_mbox {
  atomic_int refs;
  corral_nats *conn; /* retained */
  uv_mutex_t lock;
  corral__nats_msg *head, **tail;
  int count;
  corral_future *waiter; /* retained: settled when a message arrives */
  natsSubscription *sub;
  int closed;
  queue node; /* in conn->mboxes */
  /* a pull mailbox: its thread fetches up to `want` messages at a time */
  int pull, want, quit, started;
  uv_cond_t cond;
  uv_thread_t thread;
  int64_t fetch_ms;
};

struct job {
  job *next;
  int (*run)(corral_nats *c, job *j, char *err, size_t errsz);
  corral_future *f; /* retained: settled with the outcome */
  corral_mbox *mb;  /* a pull subscription's mailbox (retained) */
  char *a, *b;      /* strings the job owns */
  int64_t x, y;
  natsOptions *opts;
  natsMsg *msg; /* a call to publish again (owned) */
  uint64_t due; /* not before (uv_hrtime), or 0 */
};

static uv_mutex_t list_lock;
static uv_once_t list_once = UV_ONCE_INIT;
static queue conns;

static void list_init(void) {
  if (uv_mutex_init(&list_lock) != 0) abort();
  queue_init(&conns);
}

/* ======================================================================== */
/* Errors                                                                    */
/* ======================================================================== */

/* Text for a failed libnats call: its status and the last error's text. */
static void nats_text(natsStatus s, const char *what, char *err, size_t errsz) {
  const char *last = nats_GetLastError(NULL);
  const char *st = natsStatus_GetText(s);
  if (last != NULL && *last && strcmp(last, st) != 0)
    snprintf(err, errsz, "%s: %s (%s)", what, st, last);
  else
    snprintf(err, errsz, "%s: %s", what, st);
}

static void fail(corral_future *f, const char *kind, const char *msg) {
  if (f != NULL) corral__future_set_error(f, kind, msg);
}

/* ======================================================================== */
/* Pending calls                                                             */
/* ======================================================================== */

/* Under c->lock. */
static pending *take_pending(corral_nats *c, uint64_t n) {
  pending **pp = &c->buckets[n % NBUCKETS];
  for (; *pp != NULL; pp = &(*pp)->next) {
    if ((*pp)->n == n) {
      pending *p = *pp;
      *pp = p->next;
      c->npending--;
      return p;
    }
  }
  return NULL;
}

/* The reply subject's number, or 0 (not one of ours). */
static uint64_t reply_number(corral_nats *c, const char *subj) {
  size_t il = strlen(c->inbox);
  if (subj == NULL || strncmp(subj, c->inbox, il) != 0 || subj[il] != '.') return 0;
  char *end;
  errno = 0;
  unsigned long long n = strtoull(subj + il + 1, &end, 10);
  if (errno != 0 || *end != '\0') return 0;
  return n;
}

/* Settle a pending call with a reply (bytes from outside the process). */
static void settle_reply(pending *p, natsMsg *m) {
  const char *status = NULL;
  const char *data = natsMsg_GetData(m);
  int len = natsMsg_GetDataLength(m);
  char msg[512];
  if (natsMsg_IsNoResponders(m)) {
    snprintf(msg, sizeof msg, "%s: no host answers (it is not running, or it died)", p->what);
    fail(p->f, "WorkerCrashed", msg);
    return;
  }
  natsMsgHeader_Get(m, "Corral-Status", &status);
  if (status == NULL) status = "";
  if (strcmp(status, "ok") == 0 || strcmp(status, "error") == 0) {
    int ok = status[0] == 'o';
    const char *why = corral__codec_check_foreign(data, (size_t)len);
    if (why == NULL && !ok &&
        (len < 2 || ((unsigned char)data[0] & 0xf0) != 0x90 ||
         ((unsigned char)data[1] & 0xf0) != 0x80))
      why = "an error must be one map";
    if (why != NULL) {
      snprintf(msg, sizeof msg, "%s: the host's reply cannot be decoded: %s", p->what, why);
      fail(p->f, "CodecError", msg);
      return;
    }
    char *copy = malloc(len > 0 ? (size_t)len : 1);
    if (copy == NULL) {
      fail(p->f, "CodecError", "out of memory for a reply");
      return;
    }
    memcpy(copy, data, (size_t)len);
    corral__future_settle_trust(p->f, ok ? CORRAL_DONE : CORRAL_FAILED, copy, (size_t)len,
                                CODEC_FOREIGN);
    return;
  }
  if (strcmp(status, "ref") == 0) {
    /* a result too big to come back inline: it waits in the result bucket
     * under the key the payload names (corral.remote fetches it, or hands
     * the key on to the next call) */
    char key[128];
    int ok = len > 0 && len < (int)sizeof key;
    for (int i = 0; ok && i < len; i++) {
      char ch = data[i];
      ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '-' || ch == '_';
    }
    if (!ok) {
      snprintf(msg, sizeof msg, "%s: the host's reply names no valid result key", p->what);
      fail(p->f, "CodecError", msg);
      return;
    }
    memcpy(key, data, (size_t)len);
    key[len] = '\0';
    fail(p->f, "RemoteRef", key);
    return;
  }
  /* crashed, or anything else: the text says why */
  const char *kind = strcmp(status, "crashed") == 0 ? "WorkerCrashed" : "WorkerError";
  int n = len < 200 ? len : 200;
  char text[201];
  memcpy(text, data, (size_t)n);
  text[n] = '\0';
  for (int i = 0; i < n; i++)
    if ((unsigned char)text[i] < 32) text[i] = ' ';
  snprintf(msg, sizeof msg, "%s: %s", p->what, *status ? text : "a reply without a status");
  fail(p->f, kind, msg);
}

static void on_reply(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *closure) {
  (void)nc;
  (void)sub;
  corral_nats *c = closure;
  uint64_t n = reply_number(c, natsMsg_GetSubject(m));
  pending *p = NULL;
  if (n != 0) {
    uv_mutex_lock(&c->lock);
    p = take_pending(c, n);
    uv_mutex_unlock(&c->lock);
  }
  if (p != NULL) {
    settle_reply(p, m);
    corral_future_release(p->f);
    free(p);
  }
  natsMsg_Destroy(m);
}

static void republish_later(corral_nats *c, natsMsg *m);

/* JetStream did not take a call. When the server said why (its API error)
 * the call's future fails; when nothing answered (JetStream not up yet
 * after a restart, a timeout, a lost connection) it is published again a
 * little later, for as long as its call waits (its time limit ends that). */
static void on_pub_error(jsCtx *js, jsPubAckErr *pae, void *closure) {
  (void)js;
  corral_nats *c = closure;
  const char *reply = NULL;
  natsMsgHeader_Get(pae->Msg, "Corral-Reply", &reply);
  uint64_t n = reply_number(c, reply);
  pending *p = NULL;
  if (n != 0 && pae->ErrCode == 0) {
    uv_mutex_lock(&c->lock);
    int waits = !c->closed;
    if (waits) {
      waits = 0;
      for (pending *q = c->buckets[n % NBUCKETS]; q != NULL && !waits; q = q->next)
        waits = q->n == n;
    }
    uv_mutex_unlock(&c->lock);
    if (waits) {
      republish_later(c, pae->Msg);
      return;
    }
  }
  if (n != 0) {
    uv_mutex_lock(&c->lock);
    p = take_pending(c, n);
    uv_mutex_unlock(&c->lock);
  }
  if (p != NULL) {
    char msg[384];
    snprintf(msg, sizeof msg, "%s: the server did not take the call: %s", p->what,
             pae->ErrText ? pae->ErrText : natsStatus_GetText(pae->Err));
    fail(p->f, pae->Err == NATS_NO_RESPONDERS ? "WorkerCrashed" : "WorkerError", msg);
    corral_future_release(p->f);
    free(p);
  }
}

/* Fail every pending call (the connection closes). */
static void fail_pending(corral_nats *c, const char *why) {
  for (;;) {
    pending *p = NULL;
    uv_mutex_lock(&c->lock);
    for (int i = 0; i < NBUCKETS && p == NULL; i++) {
      if (c->buckets[i] != NULL) {
        p = c->buckets[i];
        c->buckets[i] = p->next;
        c->npending--;
      }
    }
    uv_mutex_unlock(&c->lock);
    if (p == NULL) return;
    char msg[256];
    snprintf(msg, sizeof msg, "%s: %s", p->what, why);
    fail(p->f, "ClosedError", msg);
    corral_future_release(p->f);
    free(p);
  }
}

/* ======================================================================== */
/* The lane                                                                  */
/* ======================================================================== */

static void job_free(job *j) {
  if (j->msg) natsMsg_Destroy(j->msg);
  if (j->f) corral_future_release(j->f);
  if (j->mb) corral__mbox_release(j->mb);
  free(j->a);
  free(j->b);
  if (j->opts) natsOptions_Destroy(j->opts);
  free(j);
}

/* Move the delayed jobs that are due to the queue; the time until the next
 * (ns), or 0 when none waits. Under lane_lock. */
static uint64_t lane_due(corral_nats *c) {
  uint64_t now = uv_hrtime(), next = 0;
  for (job **pp = &c->later; *pp != NULL;) {
    job *j = *pp;
    if (j->due <= now) {
      *pp = j->next;
      j->next = NULL;
      *c->jobs_tail = j;
      c->jobs_tail = &j->next;
    } else {
      if (next == 0 || j->due - now < next) next = j->due - now;
      pp = &j->next;
    }
  }
  return next;
}

static void lane_main(void *arg) {
  corral_nats *c = arg;
  uv_mutex_lock(&c->lane_lock);
  for (;;) {
    for (;;) {
      uint64_t wait = lane_due(c);
      if (c->jobs != NULL || c->lane_quit) break;
      if (wait == 0)
        uv_cond_wait(&c->lane_cond, &c->lane_lock);
      else
        uv_cond_timedwait(&c->lane_cond, &c->lane_lock, wait);
    }
    job *j = c->jobs;
    if (j == NULL) break;
    c->jobs = j->next;
    if (c->jobs == NULL) c->jobs_tail = &c->jobs;
    uv_mutex_unlock(&c->lane_lock);
    char err[512] = "";
    int rc = j->run(c, j, err, sizeof err);
    if (rc == 0)
      corral__future_settle(j->f, CORRAL_DONE, NULL, 0); /* (unless the job settled it) */
    else
      fail(j->f, rc == 2 ? "UsageError" : rc == 3 ? "CodecError" : "WorkerError", err);
    job_free(j);
    uv_mutex_lock(&c->lane_lock);
  }
  /* left over at close: failed */
  while (c->later != NULL) {
    job *j = c->later;
    c->later = j->next;
    fail(j->f, "ClosedError", "the NATS connection was closed");
    job_free(j);
  }
  while (c->jobs != NULL) {
    job *j = c->jobs;
    c->jobs = j->next;
    fail(j->f, "ClosedError", "the NATS connection was closed");
    job_free(j);
  }
  c->jobs_tail = &c->jobs;
  uv_mutex_unlock(&c->lane_lock);
}

/* Queue a job; its future (a new reference) says how it went. NULL: no
 * memory, or the connection is closed (the job is freed). */
static corral_future *lane_push(corral_nats *c, job *j) {
  j->f = corral__future_new();
  if (j->f == NULL) {
    job_free(j);
    return NULL;
  }
  corral_future_retain(j->f);
  uv_mutex_lock(&c->lane_lock);
  if (c->lane_quit) {
    uv_mutex_unlock(&c->lane_lock);
    fail(j->f, "ClosedError", "the NATS connection was closed");
    corral_future *f = j->f; /* (the caller's reference, taken above) */
    job_free(j);
    return f;
  }
  if (!c->lane_started) {
    if (uv_thread_create(&c->thread, lane_main, c) != 0) {
      uv_mutex_unlock(&c->lane_lock);
      fail(j->f, "WorkerError", "cannot start the NATS connection's thread");
      corral_future *f = j->f;
      job_free(j);
      return f;
    }
    c->lane_started = 1;
  }
  corral_future *f = j->f;
  corral_future_retain(f);
  if (j->due != 0) {
    j->next = c->later;
    c->later = j;
  } else {
    j->next = NULL;
    *c->jobs_tail = j;
    c->jobs_tail = &j->next;
  }
  uv_cond_signal(&c->lane_cond);
  uv_mutex_unlock(&c->lane_lock);
  corral_future_release(f); /* (the one lane_push took: the job holds its own) */
  return f;
}

static job *job_new(int (*run)(corral_nats *, job *, char *, size_t)) {
  job *j = calloc(1, sizeof *j);
  if (j != NULL) j->run = run;
  return j;
}

/* ======================================================================== */
/* Connections                                                               */
/* ======================================================================== */

static void on_disconnected(natsConnection *nc, void *closure) {
  (void)nc;
  atomic_store(&((corral_nats *)closure)->disconnected, 1);
}

static corral_future *lane_push(corral_nats *c, job *j);
static job *job_new(int (*run)(corral_nats *, job *, char *, size_t));

/* Calls JetStream had not acknowledged when the connection was lost are
 * published again (their Nats-Msg-Id makes the server drop one it stored
 * already): a call is never lost to a reconnect. */
static int republish_job(corral_nats *c, job *j, char *err, size_t errsz) {
  (void)j;
  natsMsgList list = {0};
  uv_mutex_lock(&c->lock);
  jsCtx *js = c->closed ? NULL : c->js;
  uv_mutex_unlock(&c->lock);
  if (js == NULL) return 0;
  natsStatus s = js_PublishAsyncGetPendingList(&list, js);
  if (s == NATS_NOT_FOUND) return 0;
  if (s != NATS_OK) {
    nats_text(s, "cannot list the calls to publish again", err, errsz);
    return 1;
  }
  for (int i = 0; i < list.Count; i++) {
    if (js_PublishMsgAsync(js, &list.Msgs[i], NULL) != NATS_OK) {
      /* (not taken: its call fails, as when JetStream refuses it) */
      jsPubAckErr pae = {0};
      pae.Msg = list.Msgs[i];
      pae.Err = NATS_CONNECTION_CLOSED;
      pae.ErrText = "cannot publish it again after a reconnect";
      on_pub_error(js, &pae, c);
    }
  }
  natsMsgList_Destroy(&list);
  return 0;
}

/* a copy of m (its subject, data and headers) published again in 250 ms */
static int repub_job(corral_nats *c, job *j, char *err, size_t errsz) {
  uv_mutex_lock(&c->lock);
  jsCtx *js = c->closed ? NULL : c->js;
  uv_mutex_unlock(&c->lock);
  if (js == NULL) return 0;
  jsPubOptions po;
  jsPubOptions_Init(&po);
  const char *id = NULL;
  natsMsgHeader_Get(j->msg, "Corral-Call", &id);
  po.MsgId = id;
  natsStatus s = js_PublishMsgAsync(js, &j->msg, &po);
  if (s != NATS_OK) {
    jsPubAckErr pae = {0};
    pae.Msg = j->msg;
    pae.Err = s;
    pae.ErrText = "cannot publish it again";
    pae.ErrCode = 1; /* (fails it: no endless loop here) */
    on_pub_error(js, &pae, c);
    nats_text(s, "publish again", err, errsz);
    return 1;
  }
  return 0;
}

static void republish_later(corral_nats *c, natsMsg *m) {
  natsMsg *copy = NULL;
  const char **keys = NULL;
  int nkeys = 0;
  natsStatus s = natsMsg_Create(&copy, natsMsg_GetSubject(m), NULL, natsMsg_GetData(m),
                                natsMsg_GetDataLength(m));
  if (s == NATS_OK && natsMsgHeader_Keys(m, &keys, &nkeys) == NATS_OK) {
    for (int i = 0; i < nkeys && s == NATS_OK; i++) {
      const char *v = NULL;
      if (strcmp(keys[i], "Nats-Msg-Id") != 0 && natsMsgHeader_Get(m, keys[i], &v) == NATS_OK)
        s = natsMsgHeader_Set(copy, keys[i], v);
    }
    free((void *)keys);
  }
  job *j = s == NATS_OK ? job_new(repub_job) : NULL;
  if (j == NULL) {
    natsMsg_Destroy(copy);
    return; /* (no memory: the call waits for its time limit) */
  }
  j->msg = copy;
  j->due = uv_hrtime() + 250 * 1000000ULL;
  corral_future *f = lane_push(c, j);
  if (f != NULL) corral_future_release(f);
}

static void on_reconnected(natsConnection *nc, void *closure) {
  (void)nc;
  corral_nats *c = closure;
  atomic_store(&c->disconnected, 0);
  atomic_fetch_add(&c->reconnects, 1);
  job *j = job_new(republish_job);
  if (j == NULL) return;
  corral_future *f = lane_push(c, j);
  if (f != NULL) corral_future_release(f);
}

corral_nats *corral__nats_new(void *owner) {
  uv_once(&list_once, list_init);
  corral_nats *c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  atomic_init(&c->refs, 2); /* the caller's, and the list's until closed */
  if (uv_mutex_init(&c->lock) != 0) goto fail_lock;
  if (uv_mutex_init(&c->lane_lock) != 0) goto fail_lane;
  if (uv_cond_init(&c->lane_cond) != 0) goto fail_cond;
  c->jobs_tail = &c->jobs;
  c->owner = owner;
  queue_init(&c->mboxes);
  uv_mutex_lock(&list_lock);
  queue_insert_tail(&conns, &c->node);
  uv_mutex_unlock(&list_lock);
  return c;
fail_cond:
  uv_mutex_destroy(&c->lane_lock);
fail_lane:
  uv_mutex_destroy(&c->lock);
fail_lock:
  free(c);
  return NULL;
}

void corral__nats_retain(corral_nats *c) { atomic_fetch_add(&c->refs, 1); }

void corral__nats_release(corral_nats *c) {
  if (atomic_fetch_sub(&c->refs, 1) != 1) return;
  /* The last reference. clang-analyzer cannot follow the count: */
  /* NOLINTBEGIN(clang-analyzer-unix.Malloc) */
  uv_cond_destroy(&c->lane_cond);
  uv_mutex_destroy(&c->lane_lock);
  uv_mutex_destroy(&c->lock);
  free(c);
  /* NOLINTEND(clang-analyzer-unix.Malloc) */
}

static int connect_job(corral_nats *c, job *j, char *err, size_t errsz) {
  natsConnection *nc = NULL;
  natsStatus s = natsConnection_Connect(&nc, j->opts);
  if (s != NATS_OK) {
    nats_text(s, "cannot connect to NATS", err, errsz);
    return 1;
  }
  jsCtx *js = NULL;
  jsOptions jo;
  jsOptions_Init(&jo);
  jo.PublishAsync.MaxPending = 1 << 20;
  jo.PublishAsync.ErrHandler = on_pub_error;
  jo.PublishAsync.ErrHandlerClosure = c;
  natsSubscription *rsub = NULL;
  char inbox[64];
  char *nuid = NULL;
  natsInbox *ib = NULL;
  s = natsInbox_Create(&ib);
  if (s == NATS_OK) {
    snprintf(inbox, sizeof inbox, "%s", ib);
    natsInbox_Destroy(ib);
    nuid = strrchr(inbox, '.');
  }
  if (s == NATS_OK) s = natsConnection_JetStream(&js, nc, &jo);
  char wild[80];
  snprintf(wild, sizeof wild, "%s.*", inbox);
  if (s == NATS_OK) s = natsConnection_Subscribe(&rsub, nc, wild, on_reply, c);
  if (s == NATS_OK) s = natsSubscription_SetPendingLimits(rsub, -1, -1);
  if (s == NATS_OK) s = natsConnection_FlushTimeout(nc, 5000);
  if (s != NATS_OK) {
    nats_text(s, "cannot set up the NATS connection", err, errsz);
    if (rsub) natsSubscription_Destroy(rsub);
    if (js) jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return 1;
  }
  uv_mutex_lock(&c->lock);
  int closed = c->closed;
  if (!closed) {
    c->nc = nc;
    c->js = js;
    c->rsub = rsub;
    snprintf(c->inbox, sizeof c->inbox, "%s", inbox);
    snprintf(c->id, sizeof c->id, "%s", nuid ? nuid + 1 : "x");
  }
  uv_mutex_unlock(&c->lock);
  if (closed) {
    natsSubscription_Destroy(rsub);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    snprintf(err, errsz, "the NATS connection was closed while it connected");
    return 1;
  }
  return 0;
}

/* An option that failed: 2 (a ValueError), with why. */
static int opt_fail(natsStatus s, const char *what, char *err, size_t errsz) {
  nats_text(s, what, err, errsz);
  return 2;
}

corral_future *corral__nats_connect(corral_nats *c, const corral_nats_opts *o, char *err,
                                    size_t errsz) {
  natsOptions *no = NULL;
  natsStatus s = natsOptions_Create(&no);
  int rc = 0;
  if (s != NATS_OK) {
    snprintf(err, errsz, "out of memory");
    return NULL;
  }
#define OPT(what, call)                                                                            \
  if (rc == 0 && (s = (call)) != NATS_OK) rc = opt_fail(s, what, err, errsz)
  /* a list of servers, "nats://a:4222,nats://b:4222": any one of them */
  const char *servers[16];
  char urls[1024];
  int nservers = 0;
  snprintf(urls, sizeof urls, "%s", o->url);
  for (char *save = NULL, *u = strtok_r(urls, ", ", &save); u != NULL && nservers < 16;
       u = strtok_r(NULL, ", ", &save))
    servers[nservers++] = u;
  if (nservers == 0) {
    snprintf(err, errsz, "url: no server named");
    natsOptions_Destroy(no);
    return NULL;
  }
  OPT("url", natsOptions_SetServers(no, servers, nservers));
  if (o->user) OPT("user", natsOptions_SetUserInfo(no, o->user, o->password ? o->password : ""));
  if (o->token) OPT("token", natsOptions_SetToken(no, o->token));
  if (o->name) OPT("name", natsOptions_SetName(no, o->name));
  if (o->ca || o->cert) OPT("tls", natsOptions_SetSecure(no, true));
  if (o->ca) OPT("tls.ca", natsOptions_LoadCATrustedCertificates(no, o->ca));
  if (o->cert) OPT("tls.cert", natsOptions_LoadCertificatesChain(no, o->cert, o->key));
  OPT("timeout", natsOptions_SetTimeout(no, (int64_t)(o->timeout * 1000)));
  /* reconnect for ever, keeping what is published meanwhile (8 MB) */
  OPT("reconnect", natsOptions_SetMaxReconnect(no, -1));
  OPT("reconnect", natsOptions_SetReconnectWait(no, 250));
  OPT("reconnect", natsOptions_SetReconnectBufSize(no, 8 * 1024 * 1024));
  OPT("reconnect", natsOptions_SetDisconnectedCB(no, on_disconnected, c));
  OPT("reconnect", natsOptions_SetReconnectedCB(no, on_reconnected, c));
  if (o->send_asap) OPT("send_asap", natsOptions_SetSendAsap(no, true));
#undef OPT
  if (rc != 0) {
    natsOptions_Destroy(no);
    return NULL;
  }
  job *j = job_new(connect_job);
  if (j == NULL) {
    natsOptions_Destroy(no);
    snprintf(err, errsz, "out of memory");
    return NULL;
  }
  j->opts = no;
  corral_future *f = lane_push(c, j);
  if (f == NULL) snprintf(err, errsz, "out of memory");
  return f;
}

/* The connection, or NULL with why (not connected, closed). Under c->lock. */
static natsConnection *live_nc(corral_nats *c, char *err, size_t errsz) {
  if (c->closed) {
    snprintf(err, errsz, "the NATS connection is closed");
    return NULL;
  }
  if (c->nc == NULL) snprintf(err, errsz, "the NATS connection is not connected yet");
  return c->nc;
}

static void mbox_shut(corral_mbox *mb);

int corral__nats_close(corral_nats *c) {
  uv_mutex_lock(&list_lock);
  uv_mutex_lock(&c->lock);
  if (c->closed) {
    uv_mutex_unlock(&c->lock);
    uv_mutex_unlock(&list_lock);
    return 0;
  }
  c->closed = 1;
  queue_remove(&c->node);
  uv_mutex_unlock(&c->lock);
  uv_mutex_unlock(&list_lock);
  /* the mailboxes first (their threads fetch through the connection) */
  for (;;) {
    corral_mbox *mb = NULL;
    uv_mutex_lock(&c->lock);
    if (!queue_empty(&c->mboxes)) {
      mb = queue_data(queue_head(&c->mboxes), corral_mbox, node);
      queue_remove(&mb->node);
      queue_init(&mb->node);
    }
    uv_mutex_unlock(&c->lock);
    if (mb == NULL) break;
    mbox_shut(mb);
    corral__mbox_release(mb); /* (the connection's list's) */
  }
  uv_mutex_lock(&c->lane_lock);
  c->lane_quit = 1;
  uv_cond_signal(&c->lane_cond);
  int started = c->lane_started;
  uv_mutex_unlock(&c->lane_lock);
  if (started) uv_thread_join(&c->thread);
  /* the lane has ended: nc is not changed by anyone now */
  if (c->rsub) natsSubscription_Unsubscribe(c->rsub);
  if (c->nc) natsConnection_FlushTimeout(c->nc, 1000);
  if (c->nc) natsConnection_Close(c->nc);
  if (c->rsub) natsSubscription_Destroy(c->rsub);
  if (c->kv) kvStore_Destroy(c->kv);
  c->kv = NULL;
  if (c->js) jsCtx_Destroy(c->js);
  if (c->nc) natsConnection_Destroy(c->nc);
  c->rsub = NULL;
  c->js = NULL;
  c->nc = NULL;
  fail_pending(c, "the NATS connection was closed before the reply came");
  corral__nats_release(c); /* (the list's) */
  return 0;
}

/* (each connection is retained while it is closed, then released: the
 * list holds its own reference until then; clang-analyzer cannot follow) */
/* NOLINTBEGIN(clang-analyzer-unix.Malloc) */
void corral__nats_close_all(void *owner) {
  uv_once(&list_once, list_init);
  for (;;) {
    corral_nats *c = NULL;
    uv_mutex_lock(&list_lock);
    queue *q;
    for (q = queue_head(&conns); q != &conns; q = q->next) {
      corral_nats *x = queue_data(q, corral_nats, node);
      if (x->owner == owner) {
        c = x;
        corral__nats_retain(c);
        break;
      }
    }
    uv_mutex_unlock(&list_lock);
    if (c == NULL) return;
    corral__nats_close(c);
    corral__nats_release(c);
  }
}
/* NOLINTEND(clang-analyzer-unix.Malloc) */

int corral__nats_state(corral_nats *c, char *id, size_t idsz, int *reconnects) {
  uv_mutex_lock(&c->lock);
  int st = c->closed ? 3 : c->nc == NULL ? 0 : atomic_load(&c->disconnected) ? 2 : 1;
  snprintf(id, idsz, "%s", c->id);
  uv_mutex_unlock(&c->lock);
  *reconnects = atomic_load(&c->reconnects);
  return st;
}

int corral__nats_stats(corral_nats *c, uint64_t out[4]) {
  memset(out, 0, 4 * sizeof out[0]);
  uv_mutex_lock(&c->lock);
  natsConnection *nc = c->closed ? NULL : c->nc;
  natsStatistics *st = NULL;
  int rc = -1;
  if (nc != NULL && natsStatistics_Create(&st) == NATS_OK) {
    if (natsConnection_GetStats(nc, st) == NATS_OK &&
        natsStatistics_GetCounts(st, &out[0], &out[1], &out[2], &out[3], NULL) == NATS_OK)
      rc = 0;
    natsStatistics_Destroy(st);
  }
  uv_mutex_unlock(&c->lock);
  return rc;
}

/* ======================================================================== */
/* Calls and replies                                                         */
/* ======================================================================== */

int corral__nats_call(corral_nats *c, const corral_nats_call *k, corral_future **out, uint64_t *num,
                      char *err, size_t errsz) {
  *out = NULL;
  pending *p = calloc(1, sizeof *p);
  if (p == NULL) {
    snprintf(err, errsz, "out of memory");
    return -1;
  }
  p->f = corral__future_new();
  if (p->f == NULL) {
    free(p);
    snprintf(err, errsz, "out of memory");
    return -1;
  }
  snprintf(p->what, sizeof p->what, "%s", k->what);
  uv_mutex_lock(&c->lock);
  natsConnection *nc = live_nc(c, err, errsz);
  if (nc == NULL) {
    uv_mutex_unlock(&c->lock);
    corral_future_release(p->f);
    free(p);
    return CORRAL_NATS_CLOSED;
  }
  p->n = ++c->next;
  char reply[96], callid[64], tries[24];
  snprintf(reply, sizeof reply, "%s.%llu", c->inbox, (unsigned long long)p->n);
  snprintf(callid, sizeof callid, "%s-%llu", c->id, (unsigned long long)p->n);
  snprintf(tries, sizeof tries, "%d", k->tries);
  natsMsg *m = NULL;
  natsStatus s = natsMsg_Create(&m, k->subject, k->js ? NULL : reply, k->payload, (int)k->len);
  if (s == NATS_OK) s = natsMsgHeader_Set(m, "Corral-Method", k->method);
  if (s == NATS_OK) s = natsMsgHeader_Set(m, "Corral-Call", callid);
  if (s == NATS_OK) s = natsMsgHeader_Set(m, "Corral-Reply", reply);
  if (s == NATS_OK) s = natsMsgHeader_Set(m, "Corral-Tries", tries);
  if (s == NATS_OK && k->kind) s = natsMsgHeader_Set(m, "Corral-Kind", k->kind);
  if (s == NATS_OK && k->refs && *k->refs) s = natsMsgHeader_Set(m, "Corral-Refs", k->refs);
  if (s != NATS_OK) {
    uv_mutex_unlock(&c->lock);
    nats_text(s, "cannot make the call's message", err, errsz);
    natsMsg_Destroy(m);
    corral_future_release(p->f);
    free(p);
    return -1;
  }
  /* in the table before it is sent: the reply may come at once */
  corral_future_retain(p->f);
  *out = p->f;
  pending **b = &c->buckets[p->n % NBUCKETS];
  p->next = *b;
  *b = p;
  c->npending++;
  jsCtx *js = c->js;
  uint64_t n = p->n;
  uv_mutex_unlock(&c->lock);
  if (k->js) {
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MsgId = callid;
    s = js_PublishMsgAsync(js, &m, &po);
  } else {
    s = natsConnection_PublishMsg(nc, m);
  }
  natsMsg_Destroy(m);
  *num = n;
  if (s != NATS_OK) {
    uv_mutex_lock(&c->lock);
    pending *q = take_pending(c, n);
    uv_mutex_unlock(&c->lock);
    if (q != NULL) {
      corral_future_release(q->f);
      free(q);
    }
    corral_future_release(*out);
    *out = NULL;
    nats_text(s, "cannot send the call", err, errsz);
    return s == NATS_MAX_PAYLOAD         ? CORRAL_NATS_TOO_BIG
           : s == NATS_CONNECTION_CLOSED ? CORRAL_NATS_CLOSED
                                         : -1;
  }
  return 0;
}

void corral__nats_forget(corral_nats *c, uint64_t n) {
  uv_mutex_lock(&c->lock);
  pending *p = take_pending(c, n);
  uv_mutex_unlock(&c->lock);
  if (p != NULL) {
    /* (settled: a runtime counts it among what may still settle) */
    corral__future_settle(p->f, CORRAL_CANCELLED, NULL, 0);
    corral_future_release(p->f);
    free(p);
  }
}

int corral__nats_pending(corral_nats *c) {
  uv_mutex_lock(&c->lock);
  int n = c->npending;
  uv_mutex_unlock(&c->lock);
  return n;
}

int corral__nats_publish(corral_nats *c, const char *subject, const char *status, const char *data,
                         size_t len, char *err, size_t errsz) {
  uv_mutex_lock(&c->lock);
  natsConnection *nc = live_nc(c, err, errsz);
  uv_mutex_unlock(&c->lock);
  if (nc == NULL) return -1;
  natsMsg *m = NULL;
  natsStatus s = natsMsg_Create(&m, subject, NULL, data, (int)len);
  if (s == NATS_OK && status) s = natsMsgHeader_Set(m, "Corral-Status", status);
  if (s == NATS_OK) s = natsConnection_PublishMsg(nc, m);
  natsMsg_Destroy(m);
  if (s != NATS_OK) {
    nats_text(s, "cannot publish", err, errsz);
    return -1;
  }
  return 0;
}

/* ======================================================================== */
/* Streams and consumers (on the lane)                                       */
/* ======================================================================== */

/* a = pool name; x = 1 to also make the consumer: y = ack wait (ms). */
static int stream_job(corral_nats *c, job *j, char *err, size_t errsz) {
  char stream[96], subject[96];
  snprintf(stream, sizeof stream, "CORRAL_%s", j->a);
  snprintf(subject, sizeof subject, "corral.pool.%s", j->a);
  jsStreamConfig sc;
  jsStreamConfig_Init(&sc);
  sc.Name = stream;
  const char *subjects[1] = {subject};
  sc.Subjects = subjects;
  sc.SubjectsLen = 1;
  sc.Retention = js_WorkQueuePolicy;
  sc.Storage = js_FileStorage;
  sc.Duplicates = (int64_t)120 * 1000000000; /* 2 minutes of call ids */
  jsStreamInfo *si = NULL;
  jsErrCode je = 0;
  natsStatus s = js_AddStream(&si, c->js, &sc, NULL, &je);
  if (s != NATS_OK && je == JSStreamNameExistErr) s = NATS_OK; /* made by another */
  if (si) jsStreamInfo_Destroy(si);
  if (s != NATS_OK) {
    nats_text(s, "cannot make the pool's stream", err, errsz);
    return 1;
  }
  return 0;
}

corral_future *corral__nats_ensure_pool(corral_nats *c, const char *pool) {
  job *j = job_new(stream_job);
  if (j == NULL || (j->a = strdup(pool)) == NULL) {
    if (j) job_free(j);
    return NULL;
  }
  uv_mutex_lock(&c->lock);
  int ready = c->js != NULL && !c->closed;
  uv_mutex_unlock(&c->lock);
  if (!ready) {
    /* (lane jobs run after the connect job: a connection not connected yet
     * would have it queued first; a closed one fails the job) */
  }
  return lane_push(c, j);
}

/* ======================================================================== */
/* The result bucket (on the lane)                                           */
/* ======================================================================== */

#define RESULT_BUCKET "corral_results"

/* Bind the bucket, made when missing: results are kept an hour. */
static int bind_bucket(corral_nats *c, char *err, size_t errsz) {
  if (c->kv != NULL) return 0;
  natsStatus s = js_KeyValue(&c->kv, c->js, RESULT_BUCKET);
  if (s != NATS_OK) {
    kvConfig kc;
    kvConfig_Init(&kc);
    kc.Bucket = RESULT_BUCKET;
    kc.History = 1;
    kc.TTL = (int64_t)3600 * 1000000000;
    kc.StorageType = js_FileStorage;
    s = js_CreateKeyValue(&c->kv, c->js, &kc);
    if (s != NATS_OK) s = js_KeyValue(&c->kv, c->js, RESULT_BUCKET); /* (made meanwhile) */
  }
  if (s != NATS_OK) {
    c->kv = NULL;
    nats_text(s, "cannot open the result bucket", err, errsz);
    return 1;
  }
  return 0;
}

/* a = key, b = the bytes (y of them). */
static int kv_put_job(corral_nats *c, job *j, char *err, size_t errsz) {
  if (bind_bucket(c, err, errsz) != 0) return 1;
  uint64_t rev = 0;
  natsStatus s = kvStore_Put(&rev, c->kv, j->a, j->b, (int)j->y);
  if (s != NATS_OK) {
    nats_text(s, "cannot keep the result in the result bucket", err, errsz);
    return 1;
  }
  return 0;
}

/* a = key: the job's future is settled with the value (untrusted bytes:
 * checked, decoded as foreign) here, not by the lane. */
static int kv_get_job(corral_nats *c, job *j, char *err, size_t errsz) {
  if (bind_bucket(c, err, errsz) != 0) return 1;
  kvEntry *e = NULL;
  natsStatus s = kvStore_Get(&e, c->kv, j->a);
  if (s != NATS_OK) {
    if (s == NATS_NOT_FOUND)
      snprintf(err, errsz, "result %s is not in the result bucket (it is kept an hour)", j->a);
    else
      nats_text(s, "cannot read the result bucket", err, errsz);
    return 1;
  }
  const char *v = kvEntry_Value(e);
  int len = kvEntry_ValueLen(e);
  const char *why = corral__codec_check_foreign(v, len > 0 ? (size_t)len : 0);
  char *copy = why == NULL ? malloc(len > 0 ? (size_t)len : 1) : NULL;
  if (copy != NULL) memcpy(copy, v, (size_t)len);
  kvEntry_Destroy(e);
  if (why != NULL) {
    snprintf(err, errsz, "result %s cannot be decoded: %s", j->a, why);
    return 3;
  }
  if (copy == NULL) {
    snprintf(err, errsz, "out of memory");
    return 1;
  }
  corral__future_settle_trust(j->f, CORRAL_DONE, copy, (size_t)len, CODEC_FOREIGN);
  return 0;
}

corral_future *corral__nats_kv_put(corral_nats *c, const char *key, const char *data, size_t len) {
  job *j = job_new(kv_put_job);
  if (j == NULL || (j->a = strdup(key)) == NULL || (j->b = malloc(len ? len : 1)) == NULL) {
    if (j) job_free(j);
    return NULL;
  }
  memcpy(j->b, data, len);
  j->y = (int64_t)len;
  return lane_push(c, j);
}

corral_future *corral__nats_kv_get(corral_nats *c, const char *key) {
  job *j = job_new(kv_get_job);
  if (j == NULL || (j->a = strdup(key)) == NULL) {
    if (j) job_free(j);
    return NULL;
  }
  return lane_push(c, j);
}

/* ======================================================================== */
/* Mailboxes                                                                 */
/* ======================================================================== */

/* A message taken from a mailbox: copies (the natsMsg is destroyed). */
static corral__nats_msg *msg_copy(natsMsg *m) {
  static const char *const names[CORRAL_NATS_NHDR] = {
      "Corral-Method", "Corral-Call", "Corral-Reply", "Corral-Tries",
      "Corral-Kind",   "Corral-Refs", "Corral-Status"};
  const char *subj = natsMsg_GetSubject(m), *reply = natsMsg_GetReply(m);
  const char *data = natsMsg_GetData(m);
  int len = natsMsg_GetDataLength(m);
  const char *hv[CORRAL_NATS_NHDR];
  size_t hl[CORRAL_NATS_NHDR], hsum = 0;
  for (int i = 0; i < CORRAL_NATS_NHDR; i++) {
    hv[i] = NULL;
    if (natsMsgHeader_Get(m, names[i], &hv[i]) != NATS_OK || hv[i] == NULL) hv[i] = "";
    hl[i] = strlen(hv[i]); /* (whole: a list of references may be long) */
    hsum += hl[i] + 1;
  }
  size_t sl = strlen(subj), rl = reply ? strlen(reply) : 0;
  corral__nats_msg *x = calloc(1, sizeof *x + sl + rl + (size_t)len + 3 + hsum);
  if (x == NULL) return NULL;
  char *p = x->buf;
  x->subject = p;
  memcpy(p, subj, sl + 1);
  p += sl + 1;
  x->reply = p;
  if (reply) memcpy(p, reply, rl);
  p[rl] = '\0';
  p += rl + 1;
  for (int i = 0; i < CORRAL_NATS_NHDR; i++) {
    x->hdr[i] = p;
    memcpy(p, hv[i], hl[i] + 1);
    p += hl[i] + 1;
  }
  x->data = p;
  if (len > 0) memcpy(p, data, (size_t)len);
  x->len = (size_t)len;
  jsMsgMetaData *md = NULL;
  if (reply && strncmp(reply, "$JS.ACK.", 8) == 0 && natsMsg_GetMetaData(&md, m) == NATS_OK) {
    x->delivered = md->NumDelivered;
    jsMsgMetaData_Destroy(md);
  }
  return x;
}

/* Put a message in the mailbox (any thread); takes m. */
static void mbox_put(corral_mbox *mb, natsMsg *m) {
  corral__nats_msg *x = msg_copy(m);
  natsMsg_Destroy(m);
  if (x == NULL) return; /* (no memory: as if lost; the sender's time limit or redelivery) */
  corral_future *w = NULL;
  uv_mutex_lock(&mb->lock);
  if (mb->closed) {
    uv_mutex_unlock(&mb->lock);
    free(x);
    return;
  }
  *mb->tail = x;
  mb->tail = &x->next;
  mb->count++;
  if (mb->pull && mb->want > 0) mb->want--;
  w = mb->waiter;
  mb->waiter = NULL;
  uv_mutex_unlock(&mb->lock);
  if (w != NULL) {
    corral__future_settle(w, CORRAL_DONE, NULL, 0);
    corral_future_release(w);
  }
}

static void on_msg(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *closure) {
  (void)nc;
  (void)sub;
  mbox_put(closure, m);
}

static void fetch_main(void *arg) {
  corral_mbox *mb = arg;
  uv_mutex_lock(&mb->lock);
  for (;;) {
    while (!mb->quit && mb->want <= 0)
      uv_cond_wait(&mb->cond, &mb->lock);
    if (mb->quit) break;
    int want = mb->want;
    uv_mutex_unlock(&mb->lock);
    natsMsgList list = {0};
    jsErrCode je = 0;
    natsStatus s =
        natsSubscription_Fetch(&list, mb->sub, want > 256 ? 256 : want, mb->fetch_ms, &je);
    if (s == NATS_OK) {
      for (int i = 0; i < list.Count; i++) {
        mbox_put(mb, list.Msgs[i]);
        list.Msgs[i] = NULL;
      }
    }
    natsMsgList_Destroy(&list);
    uv_mutex_lock(&mb->lock);
    if (s != NATS_OK && s != NATS_TIMEOUT && !mb->quit) {
      /* (the connection is down, or the consumer went: wait a little and
       * try again; libnats reconnects) */
      uv_mutex_unlock(&mb->lock);
      uv_sleep(100);
      uv_mutex_lock(&mb->lock);
    }
  }
  uv_mutex_unlock(&mb->lock);
}

static corral_mbox *mbox_new(corral_nats *c) {
  corral_mbox *mb = calloc(1, sizeof *mb);
  if (mb == NULL) return NULL;
  atomic_init(&mb->refs, 2); /* the caller's and the connection's list's */
  if (uv_mutex_init(&mb->lock) != 0) {
    free(mb);
    return NULL;
  }
  if (uv_cond_init(&mb->cond) != 0) {
    uv_mutex_destroy(&mb->lock);
    free(mb);
    return NULL;
  }
  mb->tail = &mb->head;
  corral__nats_retain(c);
  mb->conn = c;
  queue_init(&mb->node);
  return mb;
}

/* Into the connection's list; 0, or -1 when it is closed. */
static int mbox_link(corral_nats *c, corral_mbox *mb) {
  uv_mutex_lock(&c->lock);
  int closed = c->closed;
  if (!closed) queue_insert_tail(&c->mboxes, &mb->node);
  uv_mutex_unlock(&c->lock);
  return closed ? -1 : 0;
}

corral_mbox *corral__nats_subscribe(corral_nats *c, const char *subject, const char *group,
                                    char *err, size_t errsz) {
  corral_mbox *mb = mbox_new(c);
  if (mb == NULL) {
    snprintf(err, errsz, "out of memory");
    return NULL;
  }
  uv_mutex_lock(&c->lock);
  natsConnection *nc = live_nc(c, err, errsz);
  natsStatus s = NATS_OK;
  if (nc != NULL) {
    if (group != NULL && *group)
      s = natsConnection_QueueSubscribe(&mb->sub, nc, subject, group, on_msg, mb);
    else
      s = natsConnection_Subscribe(&mb->sub, nc, subject, on_msg, mb);
    if (s == NATS_OK) s = natsSubscription_SetPendingLimits(mb->sub, -1, -1);
    if (s == NATS_OK) queue_insert_tail(&c->mboxes, &mb->node);
  }
  uv_mutex_unlock(&c->lock);
  if (nc == NULL || s != NATS_OK) {
    if (nc != NULL) nats_text(s, "cannot subscribe", err, errsz);
    if (mb->sub) natsSubscription_Destroy(mb->sub);
    mb->sub = NULL;
    atomic_store(&mb->refs, 1);
    corral__mbox_release(mb);
    return NULL;
  }
  if (nc != NULL) natsConnection_FlushTimeout(nc, 5000);
  return mb;
}

/* a = pool, x = ack wait (ms), y = max ack pending; mb: the mailbox. */
static int pull_job(corral_nats *c, job *j, char *err, size_t errsz) {
  int rc = stream_job(c, j, err, errsz);
  if (rc != 0) return rc;
  char subject[96], durable[96], stream[96];
  snprintf(subject, sizeof subject, "corral.pool.%s", j->a);
  snprintf(durable, sizeof durable, "corral_%s", j->a);
  snprintf(stream, sizeof stream, "CORRAL_%s", j->a);
  /* The durable consumer is made here, apart from the subscription: one
   * that a subscription made is deleted when it unsubscribes (libnats),
   * and the pool's other hosts share it. The first host's settings hold;
   * a later host with others attaches to it as it is. */
  jsConsumerConfig cc;
  jsConsumerConfig_Init(&cc);
  cc.Durable = durable;
  cc.FilterSubject = subject;
  cc.AckPolicy = js_AckExplicit;
  cc.AckWait = j->x * 1000000;
  cc.MaxDeliver = -1;
  cc.MaxAckPending = j->y;
  cc.MaxWaiting = 4096;
  jsConsumerInfo *ci = NULL;
  jsErrCode je = 0;
  natsStatus s = js_AddConsumer(&ci, c->js, stream, &cc, NULL, &je);
  if (ci) jsConsumerInfo_Destroy(ci);
  /* (it fails when the consumer is there already, with other settings
   * too: the bind below says whether there is one to use) */
  char made[256] = "";
  if (s != NATS_OK) nats_text(s, "", made, sizeof made);
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = stream;
  so.Consumer = durable;
  natsSubscription *sub = NULL;
  s = js_PullSubscribe(&sub, c->js, subject, durable, NULL, &so, &je);
  if (s != NATS_OK) {
    nats_text(s, "cannot attach to the pool's consumer", err, errsz);
    if (*made) snprintf(err + strlen(err), errsz - strlen(err), " (making it%s)", made);
    return 1;
  }
  corral_mbox *mb = j->mb;
  uv_mutex_lock(&mb->lock);
  mb->sub = sub;
  int quit = mb->quit;
  if (!quit && uv_thread_create(&mb->thread, fetch_main, mb) == 0) mb->started = 1;
  int started = mb->started;
  uv_mutex_unlock(&mb->lock);
  if (!started) {
    snprintf(err, errsz, quit ? "the pool's mailbox was closed" : "cannot start a fetch thread");
    return 1;
  }
  return 0;
}

/* (mb has two references, the caller's and the connection's list's, which
 * corral__mbox_close gives back: clang-analyzer cannot follow the count) */
/* NOLINTBEGIN(clang-analyzer-unix.Malloc) */
corral_mbox *corral__nats_pull(corral_nats *c, const char *pool, int64_t ack_wait_ms,
                               int64_t max_ack_pending, corral_future **ready, char *err,
                               size_t errsz) {
  corral_mbox *mb = mbox_new(c);
  if (mb == NULL) {
    snprintf(err, errsz, "out of memory");
    return NULL;
  }
  mb->pull = 1;
  mb->fetch_ms = 1000;
  if (mbox_link(c, mb) != 0) {
    snprintf(err, errsz, "the NATS connection is closed");
    atomic_store(&mb->refs, 1);
    corral__mbox_release(mb);
    return NULL;
  }
  job *j = job_new(pull_job);
  if (j == NULL || (j->a = strdup(pool)) == NULL) {
    if (j) job_free(j);
    snprintf(err, errsz, "out of memory");
    corral__mbox_close(mb);
    corral__mbox_release(mb);
    return NULL;
  }
  j->x = ack_wait_ms;
  j->y = max_ack_pending;
  atomic_fetch_add(&mb->refs, 1);
  j->mb = mb;
  *ready = lane_push(c, j);
  return mb;
}
/* NOLINTEND(clang-analyzer-unix.Malloc) */

/* Stop a mailbox's sources: its thread, its subscription. */
static void mbox_shut(corral_mbox *mb) {
  uv_mutex_lock(&mb->lock);
  int was = mb->closed;
  mb->closed = 1;
  mb->quit = 1;
  uv_cond_signal(&mb->cond);
  int started = mb->started;
  corral_future *w = mb->waiter;
  mb->waiter = NULL;
  uv_mutex_unlock(&mb->lock);
  if (was) return;
  if (started) uv_thread_join(&mb->thread);
  if (mb->sub) {
    natsSubscription_Unsubscribe(mb->sub);
    natsSubscription_Destroy(mb->sub);
  }
  uv_mutex_lock(&mb->lock);
  mb->sub = NULL;
  uv_mutex_unlock(&mb->lock);
  if (w != NULL) {
    corral__future_settle(w, CORRAL_DONE, NULL, 0);
    corral_future_release(w);
  }
}

void corral__mbox_close(corral_mbox *mb) {
  corral_nats *c = mb->conn;
  uv_mutex_lock(&c->lock);
  int linked = !queue_empty(&mb->node);
  if (linked) {
    queue_remove(&mb->node);
    queue_init(&mb->node);
  }
  uv_mutex_unlock(&c->lock);
  mbox_shut(mb);
  if (linked) corral__mbox_release(mb);
}

void corral__mbox_release(corral_mbox *mb) {
  if (atomic_fetch_sub(&mb->refs, 1) != 1) return;
  /* The last reference. clang-analyzer cannot follow the count: */
  /* NOLINTBEGIN(clang-analyzer-unix.Malloc) */
  while (mb->head != NULL) {
    corral__nats_msg *x = mb->head;
    mb->head = x->next;
    free(x);
  }
  if (mb->waiter) corral_future_release(mb->waiter);
  corral__nats_release(mb->conn);
  uv_cond_destroy(&mb->cond);
  uv_mutex_destroy(&mb->lock);
  free(mb);
  /* NOLINTEND(clang-analyzer-unix.Malloc) */
}

corral_future *corral__mbox_wait(corral_mbox *mb) {
  corral_future *f = corral__future_new();
  if (f == NULL) return NULL;
  uv_mutex_lock(&mb->lock);
  if (mb->count > 0 || mb->closed) {
    uv_mutex_unlock(&mb->lock);
    corral__future_settle(f, CORRAL_DONE, NULL, 0);
    return f;
  }
  corral_future *old = mb->waiter; /* (one waiter, the newest: the one before is let go) */
  corral_future_retain(f);
  mb->waiter = f;
  uv_mutex_unlock(&mb->lock);
  if (old != NULL) {
    corral__future_settle(old, CORRAL_DONE, NULL, 0);
    corral_future_release(old);
  }
  return f;
}

int corral__mbox_take(corral_mbox *mb, corral__nats_msg **out, int max, int *closed) {
  int n = 0;
  uv_mutex_lock(&mb->lock);
  while (n < max && mb->head != NULL) {
    corral__nats_msg *x = mb->head;
    mb->head = x->next;
    if (mb->head == NULL) mb->tail = &mb->head;
    mb->count--;
    out[n++] = x;
  }
  *closed = mb->closed && mb->head == NULL;
  uv_mutex_unlock(&mb->lock);
  return n;
}

void corral__mbox_want(corral_mbox *mb, int n) {
  uv_mutex_lock(&mb->lock);
  mb->want = n;
  if (n > 0) uv_cond_signal(&mb->cond);
  uv_mutex_unlock(&mb->lock);
}

/* JetStream acknowledgements go to the message's reply subject ("+ACK",
 * "+WPI" in progress, "+TERM" do not deliver again). */
int corral__nats_ack(corral_nats *c, const char *reply, const char *what) {
  char err[64];
  return corral__nats_publish(c, reply, NULL, what, strlen(what), err, sizeof err);
}
