/* nats_raw: the raw figures of a NATS server measured with libnats directly,
 * the figures remote workers (issue 13) will be compared against. The server
 * is given (bench/run.py starts one, as tests/nats.lua does).
 *
 *   nats_raw check URL [USER PASSWORD] [CAFILE]  connect + flush: "ok", or
 *                                                the error and exit 1
 *   nats_raw rtt URL N          core request/reply, one in flight: median us
 *   nats_raw throughput URL N   core request/reply, 256 in flight: requests/s
 *   nats_raw js URL N           JetStream: js_Publish (waits for the PubAck),
 *                               Fetch 1 from a durable pull consumer of a
 *                               work-queue stream, AckSync: median us
 *   nats_raw js-throughput URL N  JetStream, 256 in flight: js_PublishAsync
 *                               (at most 256 PubAcks pending, and at most 256
 *                               messages published and not yet acked), a
 *                               second connection's pull consumer fetching
 *                               in batches (what is published and not yet
 *                               taken) and acking each (Ack, no wait for the
 *                               server): messages/s
 *
 * The responder of the core modes is a second connection of this process
 * (libnats' delivery thread answers). Publishes are sent at once
 * (natsOptions_SetSendAsap), not held by libnats' flusher (NATS_BUFFERED=1
 * measures the default). The last word printed is the figure. */
#include <nats/nats.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WINDOW 256

static void die(const char *what, natsStatus s) {
  const char *last = nats_GetLastError(NULL);
  fprintf(stderr, "nats_raw: %s: %s%s%s\n", what, natsStatus_GetText(s), last ? ": " : "",
          last ? last : "");
  exit(1);
}

#define TRY(what, call)                                                                            \
  do {                                                                                             \
    natsStatus s_ = (call);                                                                        \
    if (s_ != NATS_OK) die(what, s_);                                                              \
  } while (0)

static natsConnection *connect_to(const char *url, const char *user, const char *pass,
                                  const char *ca, natsStatus *st) {
  natsOptions *o = NULL;
  natsConnection *nc = NULL;
  TRY("options", natsOptions_Create(&o));
  TRY("url", natsOptions_SetURL(o, url));
  /* without it, libnats' flusher thread holds a publish up to ~1 ms (its
   * round trips measured ~1000 us here instead of tens of us); NATS_BUFFERED=1
   * measures that default */
  if (!getenv("NATS_BUFFERED")) TRY("send asap", natsOptions_SetSendAsap(o, true));
  if (user) TRY("user", natsOptions_SetUserInfo(o, user, pass));
  if (ca) {
    TRY("secure", natsOptions_SetSecure(o, true));
    TRY("ca", natsOptions_LoadCATrustedCertificates(o, ca));
  }
  *st = natsConnection_Connect(&nc, o);
  if (*st == NATS_OK) *st = natsConnection_FlushTimeout(nc, 5000);
  natsOptions_Destroy(o);
  return nc;
}

static int cmp(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

static double median_us(int64_t *ns, int n) {
  qsort(ns, (size_t)n, sizeof *ns, cmp);
  return (double)ns[n / 2] / 1000.0;
}

static void on_request(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *c) {
  (void)sub;
  (void)c;
  natsConnection_Publish(nc, natsMsg_GetReply(m), natsMsg_GetData(m), natsMsg_GetDataLength(m));
  natsMsg_Destroy(m);
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int in_flight, answered;

static void on_reply(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *c) {
  (void)nc;
  (void)sub;
  (void)c;
  natsMsg_Destroy(m);
  pthread_mutex_lock(&mu);
  in_flight--;
  answered++;
  pthread_cond_signal(&cv);
  pthread_mutex_unlock(&mu);
}

static int core(const char *url, int n, int window) {
  natsStatus st;
  natsConnection *srv = connect_to(url, NULL, NULL, NULL, &st);
  if (st != NATS_OK) die("connect", st);
  natsConnection *nc = connect_to(url, NULL, NULL, NULL, &st);
  if (st != NATS_OK) die("connect", st);
  natsSubscription *rsub = NULL, *isub = NULL;
  TRY("subscribe", natsConnection_Subscribe(&rsub, srv, "bench.echo", on_request, NULL));
  TRY("flush", natsConnection_Flush(srv));
  const char payload[16] = "0123456789abcdef";
  for (int i = 0; i < 1000; i++) { /* warm-up */
    natsMsg *r = NULL;
    TRY("request", natsConnection_Request(&r, nc, "bench.echo", payload, 16, 5000));
    natsMsg_Destroy(r);
  }
  if (window == 1) {
    int64_t *ns = malloc(sizeof *ns * (size_t)n);
    for (int i = 0; i < n; i++) {
      natsMsg *r = NULL;
      int64_t t = nats_NowInNanoSeconds();
      TRY("request", natsConnection_Request(&r, nc, "bench.echo", payload, 16, 5000));
      ns[i] = nats_NowInNanoSeconds() - t;
      natsMsg_Destroy(r);
    }
    printf("core request/reply round trip, 1 in flight, median of %d: %.2f\n", n, median_us(ns, n));
    free(ns);
  } else {
    TRY("subscribe", natsConnection_Subscribe(&isub, nc, "bench.inbox", on_reply, NULL));
    TRY("flush", natsConnection_Flush(nc));
    int64_t t = nats_NowInNanoSeconds();
    for (int i = 0; i < n; i++) {
      pthread_mutex_lock(&mu);
      while (in_flight >= window)
        pthread_cond_wait(&cv, &mu);
      in_flight++;
      pthread_mutex_unlock(&mu);
      TRY("publish", natsConnection_PublishRequest(nc, "bench.echo", "bench.inbox", payload, 16));
    }
    pthread_mutex_lock(&mu);
    while (answered < n)
      pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    double secs = (double)(nats_NowInNanoSeconds() - t) / 1e9;
    printf("core request/reply, %d in flight, %d requests: %.0f\n", window, n, n / secs);
    natsSubscription_Destroy(isub);
  }
  natsSubscription_Destroy(rsub);
  natsConnection_Destroy(nc);
  natsConnection_Destroy(srv);
  return 0;
}

static int jetstream(const char *url, int n) {
  natsStatus st;
  natsConnection *nc = connect_to(url, NULL, NULL, NULL, &st);
  if (st != NATS_OK) die("connect", st);
  jsCtx *js = NULL;
  jsErrCode jerr = 0;
  TRY("jetstream", natsConnection_JetStream(&js, nc, NULL));
  /* a pool's stream: work-queue retention, one subject */
  jsStreamConfig sc;
  jsStreamConfig_Init(&sc);
  const char *subjects[] = {"bench.work"};
  sc.Name = "BENCH";
  sc.Subjects = subjects;
  sc.SubjectsLen = 1;
  sc.Retention = js_WorkQueuePolicy;
  sc.Storage = js_FileStorage;
  jsStreamInfo *si = NULL;
  TRY("add stream", js_AddStream(&si, js, &sc, NULL, &jerr));
  jsStreamInfo_Destroy(si);
  /* its durable pull consumer, with the settings issue 13 maps calls to */
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Config.AckPolicy = js_AckExplicit;
  so.Config.AckWait = (int64_t)30 * 1000000000;
  so.Config.MaxDeliver = 3;
  so.Config.MaxAckPending = WINDOW;
  natsSubscription *sub = NULL;
  TRY("pull subscribe", js_PullSubscribe(&sub, js, "bench.work", "workers", NULL, &so, &jerr));
  const char payload[16] = "0123456789abcdef";
  int64_t *ns = malloc(sizeof *ns * (size_t)n);
  for (int i = -200; i < n; i++) { /* 200 warm-up rounds */
    int64_t t = nats_NowInNanoSeconds();
    jsPubAck *pa = NULL;
    TRY("js publish", js_Publish(&pa, js, "bench.work", payload, 16, NULL, &jerr));
    jsPubAck_Destroy(pa);
    natsMsgList list = {0};
    TRY("fetch", natsSubscription_Fetch(&list, sub, 1, 5000, &jerr));
    if (list.Count != 1) die("fetch count", NATS_ERR);
    TRY("ack", natsMsg_AckSync(list.Msgs[0], NULL, &jerr));
    natsMsgList_Destroy(&list);
    if (i >= 0) ns[i] = nats_NowInNanoSeconds() - t;
  }
  printf("JetStream publish+fetch+ack round trip, median of %d: %.2f\n", n, median_us(ns, n));
  free(ns);
  natsSubscription_Unsubscribe(sub); /* deletes the consumer it created */
  natsSubscription_Destroy(sub);
  js_DeleteStream(js, "BENCH", NULL, &jerr);
  jsCtx_Destroy(js);
  natsConnection_Destroy(nc);
  return 0;
}

/* js-throughput: the consumer's side, a thread of its own on its own
 * connection; `consumed` counts what it has acked (mu, cv). */
static int published, consumed, consume_target;

static void *consume(void *arg) {
  natsSubscription *sub = arg;
  for (;;) {
    /* a batch of what has been published and not yet taken (a Fetch
     * waits until its whole batch has come) */
    pthread_mutex_lock(&mu);
    while (consumed < consume_target && published == consumed)
      pthread_cond_wait(&cv, &mu);
    int batch = published - consumed;
    pthread_mutex_unlock(&mu);
    if (batch == 0) break;
    natsMsgList list = {0};
    jsErrCode jerr = 0;
    TRY("fetch", natsSubscription_Fetch(&list, sub, batch, 5000, &jerr));
    int got = list.Count;
    for (int i = 0; i < got; i++)
      TRY("ack", natsMsg_Ack(list.Msgs[i], NULL));
    natsMsgList_Destroy(&list); /* (zeroes Count) */
    pthread_mutex_lock(&mu);
    consumed += got;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
  }
  return NULL;
}

/* Publish n messages, at most WINDOW of them not yet acked by the consumer;
 * the seconds until the consumer has acked them all. */
static double js_window(jsCtx *js, natsSubscription *sub, int n) {
  const char payload[16] = "0123456789abcdef";
  pthread_mutex_lock(&mu);
  published = consumed = 0;
  consume_target = n;
  pthread_mutex_unlock(&mu);
  pthread_t th;
  int64_t t = nats_NowInNanoSeconds();
  if (pthread_create(&th, NULL, consume, sub) != 0) die("thread", NATS_ERR);
  for (int i = 0; i < n; i++) {
    pthread_mutex_lock(&mu);
    while (i - consumed >= WINDOW)
      pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    TRY("js publish async", js_PublishAsync(js, "bench.tput", payload, 16, NULL));
    pthread_mutex_lock(&mu);
    published++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
  }
  jsPubOptions po;
  jsPubOptions_Init(&po);
  po.MaxWait = 10000;
  TRY("publish complete", js_PublishAsyncComplete(js, &po));
  pthread_join(th, NULL);
  return (double)(nats_NowInNanoSeconds() - t) / 1e9;
}

static int js_throughput(const char *url, int n) {
  natsStatus st;
  natsConnection *nc = connect_to(url, NULL, NULL, NULL, &st);
  if (st != NATS_OK) die("connect", st);
  natsConnection *cc = connect_to(url, NULL, NULL, NULL, &st);
  if (st != NATS_OK) die("connect", st);
  jsCtx *js = NULL, *cjs = NULL;
  jsErrCode jerr = 0;
  jsOptions jo;
  jsOptions_Init(&jo);
  jo.PublishAsync.MaxPending = WINDOW;
  TRY("jetstream", natsConnection_JetStream(&js, nc, &jo));
  TRY("jetstream", natsConnection_JetStream(&cjs, cc, NULL));
  /* (left over by a run that was killed: its consumer's unacked messages
   * would hold up this one's) */
  js_DeleteStream(js, "BENCHT", NULL, &jerr);
  jsStreamConfig sc;
  jsStreamConfig_Init(&sc);
  const char *subjects[] = {"bench.tput"};
  sc.Name = "BENCHT";
  sc.Subjects = subjects;
  sc.SubjectsLen = 1;
  sc.Retention = js_WorkQueuePolicy;
  sc.Storage = js_FileStorage;
  jsStreamInfo *si = NULL;
  TRY("add stream", js_AddStream(&si, js, &sc, NULL, &jerr));
  jsStreamInfo_Destroy(si);
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Config.AckPolicy = js_AckExplicit;
  so.Config.AckWait = (int64_t)30 * 1000000000;
  so.Config.MaxDeliver = 3;
  so.Config.MaxAckPending = 1000; /* as a pool's consumer (corral serve's default) */
  natsSubscription *sub = NULL;
  TRY("pull subscribe", js_PullSubscribe(&sub, cjs, "bench.tput", "tput", NULL, &so, &jerr));
  js_window(js, sub, n / 10 > 1000 ? 1000 : n / 10 + 1); /* warm-up */
  double secs = js_window(js, sub, n);
  printf("JetStream publish+fetch+ack, %d in flight, %d messages: %.0f\n", WINDOW, n, n / secs);
  natsSubscription_Unsubscribe(sub);
  natsSubscription_Destroy(sub);
  js_DeleteStream(js, "BENCHT", NULL, &jerr);
  jsCtx_Destroy(cjs);
  jsCtx_Destroy(js);
  natsConnection_Destroy(cc);
  natsConnection_Destroy(nc);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(
        stderr,
        "usage: nats_raw check|rtt|throughput|js|js-throughput URL [N | USER PASSWORD] [CAFILE]\n");
    return 2;
  }
  const char *mode = argv[1], *url = argv[2];
  int n = argc > 3 ? atoi(argv[3]) : 10000;
  int rc;
  if (strcmp(mode, "check") == 0) {
    const char *user = argc > 4 ? argv[3] : NULL, *pass = argc > 4 ? argv[4] : NULL;
    const char *ca = argc > 5 ? argv[5] : (argc == 4 ? argv[3] : NULL);
    natsStatus st;
    natsConnection *nc = connect_to(url, user, pass, ca, &st);
    if (st != NATS_OK) {
      const char *last = nats_GetLastError(NULL);
      printf("error: %s%s%s\n", natsStatus_GetText(st), last ? ": " : "", last ? last : "");
      rc = 1;
    } else {
      printf("ok\n");
      rc = 0;
    }
    natsConnection_Destroy(nc);
  } else if (strcmp(mode, "rtt") == 0) {
    rc = core(url, n, 1);
  } else if (strcmp(mode, "throughput") == 0) {
    rc = core(url, n, WINDOW);
  } else if (strcmp(mode, "js") == 0) {
    rc = jetstream(url, n);
  } else if (strcmp(mode, "js-throughput") == 0) {
    rc = js_throughput(url, n);
  } else {
    fprintf(stderr, "nats_raw: unknown mode %s\n", mode);
    rc = 2;
  }
  nats_Close();
  return rc;
}
