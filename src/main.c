/* main.c: the `corral` command: runs a script or a string (corral.cli), and
 * on a terminal the interactive REPL, whose terminal half is here.
 *
 * The REPL polls three things: standard input (libedit reads it a key at a
 * time, through its readline callback interface), the home loop's backend
 * fd with corral_backend_timeout, and the output relay. While the REPL runs,
 * fds 1 and 2 are a pipe: a relay thread copies what any thread or child
 * process writes there into memory, and this thread prints it above the
 * prompt (the prompt and the line being typed are erased and drawn again
 * below it). Only this thread writes to the terminal; the relay thread never
 * blocks a writer, however much is printed in one step. Lines go to the Lua
 * half (corral.repl) between two steps of the loop, never inside one. */
#include <editline/readline.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "corral.h"

/* ======================================================================== */
/* Output relay                                                              */
/* ======================================================================== */

static struct {
  pthread_mutex_t mu;
  pthread_cond_t ended_cv;
  char *buf;
  size_t len, cap;
  int ended;     /* the relay read end of file: every writer is gone */
  int in;        /* the read end of the pipe that fds 1 and 2 point to */
  int notify[2]; /* a byte when buf turns non-empty */
  int tty;       /* the terminal (a dup of the first stdout) */
  int tty_err;   /* the first stderr */
  int on;        /* fds 1 and 2 are redirected */
} out = {.mu = PTHREAD_MUTEX_INITIALIZER, .ended_cv = PTHREAD_COND_INITIALIZER, .tty = -1};

static void write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    p += w;
    n -= (size_t)w;
  }
}

/* Read what the pipe holds into buf (out.mu held; every read is made under
 * it, so that chunks stay in order). Returns 1 when something was added. */
static int relay_read(void) {
  char chunk[8192];
  int added = 0;
  for (;;) {
    ssize_t n = read(out.in, chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) out.ended = 1;
    if (n <= 0) return added;
    if (out.len + (size_t)n > out.cap) {
      size_t cap = out.cap ? out.cap : 8192;
      while (cap < out.len + (size_t)n)
        cap *= 2;
      char *b = realloc(out.buf, cap);
      if (b == NULL) continue; /* drop it rather than block the writers */
      out.buf = b;
      out.cap = cap;
    }
    memcpy(out.buf + out.len, chunk, (size_t)n);
    out.len += (size_t)n;
    added = 1;
  }
}

static void *relay_main(void *arg) {
  (void)arg;
  struct pollfd pfd = {.fd = out.in, .events = POLLIN};
  for (;;) {
    if (poll(&pfd, 1, -1) < 0 && errno != EINTR) break;
    pthread_mutex_lock(&out.mu);
    int was_empty = out.len == 0;
    int added = relay_read();
    int ended = out.ended;
    if (ended) pthread_cond_signal(&out.ended_cv);
    pthread_mutex_unlock(&out.mu);
    if (added && was_empty) {
      ssize_t rc = write(out.notify[1], "x", 1);
      (void)rc;
    }
    if (ended) break;
  }
  return NULL;
}

/* Take what the relay holds and what the pipe holds now (the caller frees
 * it): everything this thread wrote before is in it. */
static char *relay_take(size_t *len) {
  char drain[64];
  while (read(out.notify[0], drain, sizeof drain) > 0) {
  }
  pthread_mutex_lock(&out.mu);
  relay_read();
  char *b = out.buf;
  *len = out.len;
  out.buf = NULL;
  out.len = out.cap = 0;
  pthread_mutex_unlock(&out.mu);
  return b;
}

/* Point fds 1 and 2 at a pipe that the relay thread reads. */
static int relay_start(void) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0 || fcntl(p[0], F_SETFL, O_NONBLOCK) != 0 ||
      pipe2(out.notify, O_CLOEXEC | O_NONBLOCK) != 0)
    return -1;
  fflush(stdout);
  fflush(stderr);
  out.tty = fcntl(1, F_DUPFD_CLOEXEC, 3);
  out.tty_err = fcntl(2, F_DUPFD_CLOEXEC, 3);
  out.in = p[0];
  if (out.tty < 0 || out.tty_err < 0 || dup2(p[1], 1) < 0 || dup2(p[1], 2) < 0) return -1;
  close(p[1]);
  setvbuf(stdout, NULL, _IOLBF, 0); /* a pipe now: whole lines, promptly */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old); /* signals go to the loop's thread */
  pthread_t th;
  int rc = pthread_create(&th, NULL, relay_main, NULL);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc != 0) return -1;
  pthread_detach(th);
  out.on = 1;
  return 0;
}

/* Give fds 1 and 2 back to the terminal and print what is left: what the
 * relay holds, then what reaches it until every writer has closed the pipe
 * (a child process still running may hold it: wait 300 ms at most). */
static void relay_stop(void) {
  if (!out.on) return;
  out.on = 0;
  fflush(stdout);
  fflush(stderr);
  dup2(out.tty, 1);
  dup2(out.tty_err, 2);
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_nsec += 300 * 1000000L;
  if (until.tv_nsec >= 1000000000L) {
    until.tv_sec++;
    until.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&out.mu);
  while (!out.ended)
    if (pthread_cond_timedwait(&out.ended_cv, &out.mu, &until) != 0) break;
  pthread_mutex_unlock(&out.mu);
  size_t len;
  char *b = relay_take(&len);
  write_all(1, b, len);
  free(b);
}

/* ======================================================================== */
/* The REPL                                                                  */
/* ======================================================================== */

static lua_State *RL; /* the runtime's state, for the libedit callbacks */
static int repl_ref = LUA_NOREF;
static int prompt_shown; /* libedit has the prompt and the line on screen */
static int got_line;
static char *line_in;
static int at_line_start = 1; /* the last output printed ended with a newline */
static int tty_in;            /* standard input is a terminal (else: lines, no editing) */
static int edited;            /* a key was read since the prompt (rl_point is this line's) */
static size_t prompt_len;

/* Call corral.repl[name] with the string argument (when not NULL); returns
 * its first result as a string or boolean (copied to `s`, if any). */
static int repl_call(const char *name, const char *arg, char *s, size_t size) {
  lua_State *L = RL;
  int top = lua_gettop(L), r = 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, repl_ref);
  lua_getfield(L, -1, name);
  if (arg != NULL) lua_pushstring(L, arg);
  if (lua_pcall(L, arg != NULL, 1, 0) != 0) {
    fprintf(stderr, "corral: %s\n", lua_tostring(L, -1));
  } else if (lua_isstring(L, -1) && s != NULL) {
    snprintf(s, size, "%s", lua_tostring(L, -1));
    r = 1;
  } else {
    r = lua_toboolean(L, -1);
  }
  lua_settop(L, top);
  return r;
}

static void on_line(char *line) {
  got_line = 1;
  line_in = line;
}

/* Tab: the completions of the word before the cursor, from corral.repl. */
static char **completions;
static size_t ncompletions, next_completion;

static char *complete_next(const char *text, int state) {
  (void)text;
  if (state == 0) next_completion = 0;
  return next_completion < ncompletions ? strdup(completions[next_completion++]) : NULL;
}

static char **complete(const char *text, int start, int end) {
  (void)start;
  (void)end;
  lua_State *L = RL;
  rl_attempted_completion_over = 1; /* never file names */
  for (size_t i = 0; i < ncompletions; i++)
    free(completions[i]);
  free(completions);
  completions = NULL;
  ncompletions = 0;
  int top = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, repl_ref);
  lua_getfield(L, -1, "complete");
  lua_pushstring(L, text);
  if (lua_pcall(L, 1, 1, 0) == 0 && lua_istable(L, -1)) {
    size_t n = lua_objlen(L, -1);
    completions = calloc(n ? n : 1, sizeof *completions);
    for (size_t i = 0; completions != NULL && i < n; i++) {
      lua_rawgeti(L, -1, (int)i + 1);
      const char *c = lua_tostring(L, -1);
      if (c != NULL && (completions[ncompletions] = strdup(c)) != NULL) ncompletions++;
      lua_pop(L, 1);
    }
  }
  lua_settop(L, top);
  return ncompletions > 0 ? rl_completion_matches(text, complete_next) : NULL;
}

static void show_prompt(void) {
  if (!tty_in) { /* lines from a file or a pipe: no prompt, no libedit */
    prompt_shown = 1;
    return;
  }
  char prompt[16] = "> ";
  repl_call("prompt", NULL, prompt, sizeof prompt);
  if (!at_line_start) write_all(out.tty, "\n", 1); /* output without a newline */
  at_line_start = 1;
  rl_callback_handler_install(prompt, on_line);
  prompt_shown = 1;
  edited = 0;
  prompt_len = strlen(prompt);
}

/* The terminal's width now. libedit is not told of a resize (its signal
 * handlers are off: the loop owns the signals), so it is checked here. */
static int term_cols(void) {
  struct winsize ws;
  int rows = 0, cols = 0;
  rl_get_screen_size(&rows, &cols);
  if (ioctl(out.tty, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0 && ws.ws_col != cols) {
    rl_resize_terminal();
    cols = ws.ws_col;
  }
  return cols;
}

/* Erase the prompt and the line being typed, all the rows it takes on a
 * narrow terminal (from the cursor's row down), and go to where it began. */
static void erase_line(void) {
  int cols = term_cols();
  size_t at = prompt_len + (edited && rl_point > 0 ? (size_t)rl_point : 0);
  char up[32] = "";
  if (cols > 0 && at / (size_t)cols > 0) snprintf(up, sizeof up, "\033[%zuA", at / (size_t)cols);
  write_all(out.tty, "\r", 1);
  write_all(out.tty, up, strlen(up));
  write_all(out.tty, "\033[J", 3);
}

/* Print what the relay holds: above the prompt, when one is shown. */
static void print_output(void) {
  size_t len;
  char *b = relay_take(&len);
  if (len == 0) {
    free(b);
    return;
  }
  fflush(rl_outstream);
  if (prompt_shown && tty_in) erase_line();
  write_all(out.tty, b, len);
  at_line_start = b[len - 1] == '\n';
  if (prompt_shown && tty_in) {
    if (b[len - 1] != '\n') write_all(out.tty, "\n", 1);
    rl_forced_update_display();
  }
  free(b);
}

/* Leave the prompt: libedit gives the terminal back (cooked, so Ctrl-C is
 * a signal), and the prompt it drew again after the line is erased. */
static void hide_prompt(void) {
  if (!tty_in) {
    prompt_shown = 0;
    return;
  }
  rl_callback_handler_remove();
  fflush(rl_outstream);
  write_all(out.tty, "\r\033[K", 4);
  prompt_shown = 0;
}

/* Standard input, reported readable by poll, is at its end (a terminal that
 * hung up, a pipe or file that ended, /dev/null): nothing left to read.
 * libedit's callback interface ignores an end of input (it would be polled
 * and read again forever), and while a line runs the terminal is cooked, so
 * a Ctrl-D on an empty line is such an end too. */
static int stdin_ended(short revents) {
  if ((revents & (POLLHUP | POLLERR | POLLNVAL)) && !(revents & POLLIN)) return 1;
  int n = 0;
  if (ioctl(0, FIONREAD, &n) != 0) return !isatty(0); /* (/dev/null and the like) */
  return n == 0;
}

/* The next line of a standard input that is not a terminal (libedit's
 * callback interface would hand it over a character at a time, as empty
 * lines): read what is there, and take one line, or the end. */
static char *acc;
static size_t alen;

static int plain_line_ready(void) { return acc != NULL && memchr(acc, '\n', alen) != NULL; }

static void read_plain_line(int do_read) {
  char chunk[4096];
  ssize_t n = do_read ? read(0, chunk, sizeof chunk) : 1;
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
  if (n > 0 && do_read) {
    char *a = realloc(acc, alen + (size_t)n + 1);
    if (a == NULL) return;
    acc = a;
    memcpy(acc + alen, chunk, (size_t)n);
    alen += (size_t)n;
  }
  char *nl = acc != NULL ? memchr(acc, '\n', alen) : NULL;
  if (nl == NULL && n > 0) return;
  got_line = 1;
  if (acc == NULL || (nl == NULL && alen == 0)) { /* (no acc: nothing was read) */
    line_in = NULL;                               /* the end */
    return;
  }
  size_t l = nl != NULL ? (size_t)(nl - acc) : alen;
  line_in = malloc(l + 1);
  if (line_in != NULL) {
    memcpy(line_in, acc, l);
    line_in[l] = '\0';
  }
  size_t used = nl != NULL ? l + 1 : alen;
  memmove(acc, acc + used, alen - used);
  alen -= used;
}

static void history_path(char *path, size_t size) {
  const char *home = getenv("HOME");
  snprintf(path, size, "%s/.corral_history", home != NULL ? home : ".");
}

/* Run the REPL until Ctrl-D, corral.exit() or SIGTERM; returns the status. */
static int repl(corral_runtime *rt) {
  RL = corral_lua(rt);
  lua_State *L = RL;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral.repl");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    fprintf(stderr, "corral: %s\n", lua_tostring(L, -1));
    return 1;
  }
  repl_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  char banner[256];
  if (repl_call("start", NULL, banner, sizeof banner)) printf("%s\n", banner);
  if (relay_start() != 0) {
    perror("corral: the REPL's output pipe");
    return 1;
  }

  char hist[4096];
  history_path(hist, sizeof hist);
  rl_readline_name = "corral";
  rl_catch_signals = 0; /* Ctrl-C is the loop's: corral.repl decides */
  rl_instream = stdin;
  rl_outstream = fdopen(dup(out.tty), "w");
  rl_attempted_completion_function = complete;
  rl_completer_word_break_characters = " \t\n\"\\'`@$><=;|&{(,+-*/%^#~[]";
  rl_basic_word_break_characters = rl_completer_word_break_characters;
  rl_completion_append_character = '\0';
  using_history();
  read_history(hist);

  int status = 0, typed_ahead = 0;
  tty_in = isatty(0);
  for (;;) {
    int busy = repl_call("poll", NULL, NULL, 0);
    if (repl_call("take_interrupt", NULL, NULL, 0) && prompt_shown) {
      fflush(rl_outstream);
      write_all(out.tty, "^C\n", 3);
      rl_replace_line("", 0);
      hide_prompt();
    }
    if (repl_call("stop_requested", NULL, NULL, 0)) break;
    if (corral_exit_status(rt) >= 0) { /* corral.exit(n) in a line */
      status = corral_exit_status(rt);
      break;
    }
    if (!busy && !prompt_shown) {
      fflush(stdout);
      print_output(); /* the line's values before the next prompt */
      show_prompt();
    }
    struct pollfd fds[3] = {{.fd = corral_backend_fd(rt), .events = POLLIN},
                            {.fd = out.notify[0], .events = POLLIN},
                            {.fd = 0, .events = POLLIN}};
    int timeout = corral_backend_timeout(rt);
    if (prompt_shown && !tty_in && plain_line_ready()) timeout = 0;
    /* while a line runs, a terminal's input is watched for Ctrl-D only: a
     * line typed ahead waits for the prompt */
    int watch_in = prompt_shown || (tty_in && !typed_ahead);
    if (prompt_shown) typed_ahead = 0;
    if (poll(fds, watch_in ? 3 : 2, timeout) > 0) {
      if (fds[1].revents) print_output();
      if (watch_in && fds[2].revents && !tty_in) {
        read_plain_line(1);
      } else if (watch_in && fds[2].revents) {
        if (stdin_ended(fds[2].revents)) {
          got_line = 1; /* leave, as for Ctrl-D: a line still running is cancelled */
          line_in = NULL;
        } else if (prompt_shown) {
          term_cols(); /* (a resize, before the key redraws the line) */
          rl_callback_read_char();
          edited = 1;
        } else {
          typed_ahead = 1;
        }
      }
    }
    if (prompt_shown && !tty_in && !got_line && plain_line_ready()) read_plain_line(0);
    if (got_line) {
      got_line = 0;
      hide_prompt();
      if (line_in == NULL) {
        write_all(out.tty, "\n", 1);
        break;
      }
      if (tty_in && line_in[strspn(line_in, " \t")] != '\0') {
        add_history(line_in);
        write_history(hist);
      }
      repl_call("feed", line_in, NULL, 0);
      free(line_in);
      line_in = NULL;
    }
    corral_step(rt);
  }
  if (prompt_shown) hide_prompt();
  history_truncate_file(hist, 1000);
  repl_call("finish", NULL, NULL, 0);
  return status;
}

/* ======================================================================== */
/* main                                                                      */
/* ======================================================================== */

static void at_exit(void) { relay_stop(); } /* corral.exit in a line */

int main(int argc, char **argv) {
  corral_runtime *rt = corral_open();
  if (rt == NULL) return 1;
  lua_State *L = corral_lua(rt);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "corral.cli");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "main");
  lua_createtable(L, argc, 0);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  int code = 1;
  if (lua_pcall(L, 1, 2, 0) != 0) {
    fprintf(stderr, "corral: %s\n", lua_tostring(L, -1));
  } else {
    code = (int)lua_tointeger(L, -2);
    const char *then = lua_tostring(L, -1);
    if (then != NULL && strcmp(then, "repl") == 0) {
      lua_settop(L, 0);
      atexit(at_exit);
      int st = repl(rt);
      relay_stop();
      code = st;
    }
  }
  lua_settop(L, 0);
  corral_close(rt);
  return code;
}
