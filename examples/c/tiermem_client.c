/*
 * tiermem_client: a command-line client for the tiermem router in C.
 *
 * It is written from docs/protocol.md and the JSON Schema that
 * `tiermem schema` prints, and uses libzmq for the sockets and jansson for
 * JSON (Debian: libzmq3-dev, libjansson-dev). Every request is one JSON
 * frame on a DEALER socket, and every reply is printed to stdout as one
 * JSON line.
 *
 * `subscribe` reads events only through ReadLog requests, in JSON, and uses
 * the PUB socket as a wake-up signal: a PUB frame means "the log has grown",
 * so the client never decodes the MessagePack event in it. Because every
 * printed event comes from the log, in order, starting at the next expected
 * sequence number, a PUB frame that ZeroMQ dropped cannot leave a gap. It
 * only delays delivery until the next frame or the idle poll.
 *
 * Build: make, or
 *   cc -std=c11 -O2 -Wall -Wextra -o tiermem_client tiermem_client.c -lzmq -ljansson
 */

#define _GNU_SOURCE

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <jansson.h>
#include <zmq.h>

enum exit_status {
    EXIT_ANSWERED = 0,      /* Ack, Value, NotFound; or subscribe stopped */
    EXIT_REJECTED = 1,      /* the router replied Error, Conflict or Busy */
    EXIT_USAGE = 2,         /* invalid command line */
    EXIT_NO_REPLY = 3,      /* no reply, an unreadable reply, or a socket failure */
};

/* ReadLog accepts 1 to 5,000; the protocol's default is 1,000. */
enum { READ_LOG_LIMIT = 1000 };

/* Upper bound on one Busy back-off, whatever retry_after_ms the router sends. */
enum { MAX_BUSY_WAIT_MS = 10000 };

struct options {
    const char *namespace;  /* NULL: the server's default, "default" */
    const char *id;         /* NULL: a random id */
    json_t *tags;           /* array of strings, or NULL */
    double importance;
    bool has_importance;
    long long ttl_s;
    bool has_ttl;
    long long expected_version;
    bool has_expected_version;
    long long from_seq;
    long long count;        /* 0: no limit */
    long timeout_ms;
    long attempts;
    long idle_ms;           /* 0: no idle poll */
};

struct client {
    void *context;
    void *dealer;
    const char *endpoint;
    const struct options *options;
};

static volatile sig_atomic_t stop_requested = 0;

static void handle_stop_signal(int signal_number)
{
    (void)signal_number;
    stop_requested = 1;
}

static void install_signal_handlers(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = handle_stop_signal;
    sigemptyset(&action.sa_mask);
    /* No SA_RESTART, so zmq_poll returns EINTR and the loops see the flag. */
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
}

static void usage(FILE *stream)
{
    fputs(
        "usage: tiermem_client [OPTIONS] store     LANE_ENDPOINT KEY VALUE_JSON\n"
        "       tiermem_client [OPTIONS] get       LANE_ENDPOINT KEY\n"
        "       tiermem_client [OPTIONS] forget    LANE_ENDPOINT KEY\n"
        "       tiermem_client [OPTIONS] subscribe LANE_ENDPOINT PUB_ENDPOINT\n"
        "\n"
        "Sends one request to a tiermem router lane (for example\n"
        "tcp://127.0.0.1:7452) and prints the reply as one JSON line; subscribe\n"
        "prints every logged event from --from on, one JSON line each, in order.\n"
        "Put -- before a VALUE_JSON that starts with '-'.\n"
        "\n"
        "options:\n"
        "  -n, --namespace NS         namespace of the memory (server default: default)\n"
        "  -i, --id ID                store, get, forget: request id, kept for every resend\n"
        "                             (default: random)\n"
        "      --importance FLOAT     store: importance from 0.0 to 1.0\n"
        "  -t, --tag TAG              store: add a tag; repeat for more tags\n"
        "      --ttl SECONDS          store: time to live in seconds\n"
        "      --expected-version N   store, forget: write only if the key is at version N\n"
        "      --from SEQ             subscribe: first sequence number to print (default 1)\n"
        "      --count N              subscribe: exit after printing N events (default: run\n"
        "                             until SIGINT or SIGTERM)\n"
        "      --idle-ms MS           subscribe: read the log after MS milliseconds without\n"
        "                             a PUB frame, 0 to never (default 1000)\n"
        "      --timeout-ms MS        wait per attempt, in milliseconds (default 10000)\n"
        "      --attempts N           send a request at most N times (default 5)\n"
        "  -h, --help                 print this help\n"
        "\n"
        "exit status: 0 answered (Ack, Value, NotFound) or subscribe stopped;\n"
        "1 the router replied Error, Conflict or Busy; 2 invalid command line;\n"
        "3 no reply after every attempt, a reply that cannot be decoded, or a\n"
        "socket failure.\n",
        stream);
}

static bool parse_long_long(const char *text, long long min, long long max, long long *out)
{
    char *end = NULL;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < min || value > max) {
        return false;
    }
    *out = value;
    return true;
}

static bool parse_option_number(const char *name, const char *text, long long min, long long max, long long *out)
{
    if (parse_long_long(text, min, max, out)) {
        return true;
    }
    fprintf(stderr, "tiermem_client: invalid %s %s: expected an integer from %lld to %lld\n", name, text, min, max);
    return false;
}

static long long monotonic_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

static void wait_ms(long milliseconds)
{
    struct timespec delay = {milliseconds / 1000, (milliseconds % 1000) * 1000000L};
    while (nanosleep(&delay, &delay) != 0 && errno == EINTR && !stop_requested) {
    }
}

/* Fill `out` (33 bytes) with 32 random hex digits for a request id. */
static void random_hex(char out[33])
{
    unsigned char bytes[16];
    size_t filled = 0;
    while (filled < sizeof bytes) {
        ssize_t got = getrandom(bytes + filled, sizeof bytes - filled, 0);
        if (got < 0) {
            if (errno == EINTR) {
                continue;
            }
            /* getrandom fails with ENOSYS on Linux before 3.17; use the clock. */
            long long now = monotonic_ms() ^ (long long)time(NULL);
            memcpy(bytes, &now, sizeof now);
            break;
        }
        filled += (size_t)got;
    }
    for (size_t i = 0; i < sizeof bytes; i++) {
        snprintf(out + 2 * i, 3, "%02x", bytes[i]);
    }
}

static const char *string_field(const json_t *object, const char *name)
{
    const json_t *value = json_object_get(object, name);
    return json_is_string(value) ? json_string_value(value) : NULL;
}

static bool type_is(const json_t *reply, const char *type)
{
    const char *actual = string_field(reply, "type");
    return actual != NULL && strcmp(actual, type) == 0;
}

/* Receive one multipart message; return its last frame as a malloc'd buffer. */
static char *receive_payload(void *socket, size_t *size)
{
    char *payload = NULL;
    *size = 0;
    for (;;) {
        zmq_msg_t frame;
        zmq_msg_init(&frame);
        if (zmq_msg_recv(&frame, socket, 0) < 0) {
            zmq_msg_close(&frame);
            free(payload);
            return NULL;
        }
        free(payload);
        *size = zmq_msg_size(&frame);
        payload = malloc(*size + 1);
        if (payload == NULL) {
            zmq_msg_close(&frame);
            return NULL;
        }
        memcpy(payload, zmq_msg_data(&frame), *size);
        payload[*size] = '\0';
        int more = zmq_msg_more(&frame);
        zmq_msg_close(&frame);
        if (!more) {
            return payload;
        }
    }
}

/*
 * Send `request` and return the reply with the same id, or NULL.
 *
 * A request is resent with the same id after a timeout, after Busy (once
 * retry_after_ms has passed) and after an Error with code `unavailable` or
 * `internal`, following "Retrying safely" in docs/protocol.md. A reply to an
 * earlier attempt can still arrive, and its id does not match, so replies
 * are matched by id. When the reply to every attempt was Busy or a
 * retryable Error, that last reply is returned. `*raw` receives the reply
 * text as the router sent it, for printing.
 */
static json_t *call(struct client *client, json_t *request, char **raw)
{
    const struct options *options = client->options;
    const char *request_id = string_field(request, "id");
    char *frame = json_dumps(request, JSON_COMPACT | JSON_REAL_PRECISION(17));
    json_t *last_reply = NULL;
    char *last_raw = NULL;
    *raw = NULL;
    if (frame == NULL) {
        fprintf(stderr, "tiermem_client: failed to encode the request as JSON\n");
        return NULL;
    }

    for (long attempt = 1; attempt <= options->attempts && !stop_requested; attempt++) {
        if (zmq_send(client->dealer, frame, strlen(frame), 0) < 0) {
            fprintf(stderr, "tiermem_client: send to %s failed: %s\n", client->endpoint, zmq_strerror(errno));
            break;
        }
        long long deadline = monotonic_ms() + options->timeout_ms;
        bool resend = false;
        while (!resend && !stop_requested) {
            long long remaining = deadline - monotonic_ms();
            if (remaining <= 0) {
                fprintf(stderr, "tiermem_client: no reply to %s from %s within %ld ms (attempt %ld of %ld)\n",
                        request_id, client->endpoint, options->timeout_ms, attempt, options->attempts);
                break;
            }
            zmq_pollitem_t item = {client->dealer, 0, ZMQ_POLLIN, 0};
            int ready = zmq_poll(&item, 1, (long)remaining);
            if (ready < 0 && errno == EINTR) {
                continue;
            }
            if (ready < 0) {
                fprintf(stderr, "tiermem_client: poll on %s failed: %s\n", client->endpoint, zmq_strerror(errno));
                attempt = options->attempts;
                break;
            }
            if (ready == 0) {
                continue;
            }
            size_t size = 0;
            char *payload = receive_payload(client->dealer, &size);
            if (payload == NULL) {
                continue;
            }
            json_error_t error;
            json_t *reply = json_loadb(payload, size, JSON_ALLOW_NUL, &error);
            if (reply == NULL) {
                /* NOTE: jansson stores integers as long long, so a reply whose
                   value contains an integer above 2^63 - 1 cannot be read here.
                   With one request in flight this is most likely its reply, so
                   waiting for another would only end in a timeout. */
                fprintf(stderr, "tiermem_client: cannot read the JSON reply from %s: %s\n", client->endpoint, error.text);
                free(payload);
                json_decref(last_reply);
                free(last_raw);
                free(frame);
                return NULL;
            }
            /* This client has one request in flight, so a reply with another id
               is a late reply to an earlier request, and an Error without an id
               is the reply to this one, whose id the router could not read. */
            const char *reply_id = string_field(reply, "id");
            bool unreadable_id = reply_id == NULL && type_is(reply, "Error");
            if (!unreadable_id && (reply_id == NULL || strcmp(reply_id, request_id) != 0)) {
                json_decref(reply);
                free(payload);
                continue;
            }
            json_decref(last_reply);
            free(last_raw);
            last_reply = reply;
            last_raw = payload;
            if (type_is(reply, "Busy")) {
                json_int_t wait = json_integer_value(json_object_get(reply, "retry_after_ms"));
                wait = wait < 1 ? 1 : (wait > MAX_BUSY_WAIT_MS ? MAX_BUSY_WAIT_MS : wait);
                fprintf(stderr, "tiermem_client: %s is busy; resending %s in %lld ms\n", client->endpoint, request_id, (long long)wait);
                wait_ms((long)wait);
                resend = true;
                continue;
            }
            const char *code = string_field(reply, "code");
            if (type_is(reply, "Error") && code != NULL && (strcmp(code, "unavailable") == 0 || strcmp(code, "internal") == 0)) {
                fprintf(stderr, "tiermem_client: %s replied %s to %s; resending\n", client->endpoint, code, request_id);
                resend = true;
                continue;
            }
            free(frame);
            *raw = last_raw;
            return last_reply;
        }
    }
    free(frame);
    *raw = last_raw;
    return last_reply;
}

static int print_reply(json_t *reply, char *raw)
{
    if (reply == NULL) {
        fprintf(stderr, "tiermem_client: no reply\n");
        return EXIT_NO_REPLY;
    }
    printf("%s\n", raw);
    fflush(stdout);
    bool answered = type_is(reply, "Ack") || type_is(reply, "Value") || type_is(reply, "NotFound");
    json_decref(reply);
    free(raw);
    return answered ? EXIT_ANSWERED : EXIT_REJECTED;
}

/* Build a request map. A NULL `id` gets a random one; `version` 0 means an
   admin request, which has no `v` and no `namespace`. */
static json_t *new_request(const char *type, const char *id, int version, const char *namespace)
{
    char generated[3 + 33] = "c-";
    if (id == NULL) {
        random_hex(generated + 2);
    }
    json_t *request = json_object();
    json_object_set_new(request, "type", json_string(type));
    json_object_set_new(request, "id", json_string(id != NULL ? id : generated));
    if (version > 0) {
        /* Sent explicitly: an omitted `v` means the server's current version,
           which can change under a client after a server upgrade. */
        json_object_set_new(request, "v", json_integer(version));
    }
    if (version > 0 && namespace != NULL) {
        json_object_set_new(request, "namespace", json_string(namespace));
    }
    return request;
}

static int run_store(struct client *client, const char *key, const char *value_text)
{
    const struct options *options = client->options;
    json_error_t error;
    json_t *value = json_loads(value_text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &error);
    if (value == NULL) {
        fprintf(stderr, "tiermem_client: VALUE_JSON is not valid JSON (column %d): %s\n", error.column, error.text);
        return EXIT_USAGE;
    }
    json_t *request = new_request("Store", options->id, 2, options->namespace);
    json_object_set_new(request, "key", json_string(key));
    json_object_set_new(request, "value", value);
    if (options->has_importance) {
        json_object_set_new(request, "importance", json_real(options->importance));
    }
    if (options->tags != NULL) {
        json_object_set(request, "tags", options->tags);
    }
    if (options->has_ttl) {
        json_object_set_new(request, "ttl_s", json_integer(options->ttl_s));
    }
    if (options->has_expected_version) {
        json_object_set_new(request, "expected_version", json_integer(options->expected_version));
    }
    char *raw = NULL;
    json_t *reply = call(client, request, &raw);
    json_decref(request);
    return print_reply(reply, raw);
}

static int run_key_request(struct client *client, const char *type, const char *key)
{
    const struct options *options = client->options;
    json_t *request = new_request(type, options->id, 1, options->namespace);
    json_object_set_new(request, "key", json_string(key));
    if (strcmp(type, "Forget") == 0 && options->has_expected_version) {
        json_object_set_new(request, "expected_version", json_integer(options->expected_version));
    }
    char *raw = NULL;
    json_t *reply = call(client, request, &raw);
    json_decref(request);
    return print_reply(reply, raw);
}

struct subscription {
    struct client *client;
    long long next_seq;     /* the next sequence number to print */
    long long printed;
    long long pub_messages; /* PUB messages received, each a wake-up */
};

static bool subscription_done(const struct subscription *subscription)
{
    long long count = subscription->client->options->count;
    return stop_requested || (count > 0 && subscription->printed >= count);
}

/* Print one logged event if it is the next one; return false on a bad event. */
static bool print_event(struct subscription *subscription, json_t *event)
{
    json_t *seq_value = json_object_get(event, "seq");
    if (!json_is_integer(seq_value)) {
        fprintf(stderr, "tiermem_client: ReadLog returned an event without an integer seq\n");
        return false;
    }
    long long seq = json_integer_value(seq_value);
    if (seq < subscription->next_seq) {
        return true;
    }
    if (seq > subscription->next_seq) {
        fprintf(stderr, "tiermem_client: events %lld to %lld are no longer in the log; continuing at %lld\n",
                subscription->next_seq, seq - 1, seq);
    }
    char *text = json_dumps(event, JSON_COMPACT | JSON_REAL_PRECISION(17));
    if (text == NULL) {
        fprintf(stderr, "tiermem_client: failed to encode event %lld as JSON\n", seq);
        return false;
    }
    printf("%s\n", text);
    fflush(stdout);
    free(text);
    subscription->next_seq = seq + 1;
    subscription->printed++;
    return true;
}

/*
 * Print logged events from next_seq until the log has no more, with ReadLog.
 * Returns an exit status, or -1 to go on waiting for PUB frames.
 */
static int read_log(struct subscription *subscription)
{
    while (!subscription_done(subscription)) {
        /* A fresh id for each read, so a late reply to an earlier read never
           matches this one. */
        json_t *request = new_request("ReadLog", NULL, 0, NULL);
        json_object_set_new(request, "from_seq", json_integer(subscription->next_seq));
        json_object_set_new(request, "limit", json_integer(READ_LOG_LIMIT));
        char *raw = NULL;
        json_t *reply = call(subscription->client, request, &raw);
        json_decref(request);
        if (reply == NULL) {
            return stop_requested ? EXIT_ANSWERED : EXIT_NO_REPLY;
        }
        if (!type_is(reply, "LogEvents")) {
            fprintf(stderr, "tiermem_client: ReadLog from %lld failed: %s\n", subscription->next_seq, raw);
            json_decref(reply);
            free(raw);
            return EXIT_REJECTED;
        }
        json_t *events = json_object_get(reply, "events");
        long long last_seq = json_integer_value(json_object_get(reply, "last_seq"));
        size_t index;
        json_t *event;
        bool valid = json_is_array(events);
        json_array_foreach(events, index, event) {
            if (subscription_done(subscription)) {
                break;
            }
            if (!print_event(subscription, event)) {
                valid = false;
                break;
            }
        }
        size_t received = json_array_size(events);
        json_decref(reply);
        free(raw);
        if (!valid) {
            return EXIT_REJECTED;
        }
        if (received == 0 || subscription->next_seq > last_seq) {
            return -1;
        }
    }
    return EXIT_ANSWERED;
}

/* Receive and discard every PUB message already queued; return how many. */
static int drain_pub(void *sub)
{
    int drained = 0;
    for (;;) {
        zmq_msg_t frame;
        zmq_msg_init(&frame);
        int received = zmq_msg_recv(&frame, sub, ZMQ_DONTWAIT);
        bool more = received >= 0 && zmq_msg_more(&frame);
        zmq_msg_close(&frame);
        if (received < 0) {
            return drained;
        }
        if (!more) {
            drained++;
        }
    }
}

/*
 * Print every logged event from --from on, in order, each once.
 *
 * The SUB socket subscribes to every topic before the first ReadLog, so the
 * events logged after that read reach this subscriber on PUB, unless ZeroMQ
 * drops them (a subscription that is not active yet, or the high-water
 * mark). Then the idle poll or the next frame triggers the read that
 * catches up.
 */
static int run_subscribe(struct client *client, const char *pub_endpoint)
{
    const struct options *options = client->options;
    void *sub = zmq_socket(client->context, ZMQ_SUB);
    int linger = 0;
    zmq_setsockopt(sub, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
    if (zmq_connect(sub, pub_endpoint) != 0) {
        fprintf(stderr, "tiermem_client: invalid PUB endpoint %s: %s\n", pub_endpoint, zmq_strerror(errno));
        zmq_close(sub);
        return EXIT_USAGE;
    }
    struct subscription subscription = {client, options->from_seq, 0, 0};
    int status = -1;
    while (status < 0) {
        status = read_log(&subscription);
        if (status >= 0) {
            break;
        }
        if (subscription_done(&subscription)) {
            status = EXIT_ANSWERED;
            break;
        }
        zmq_pollitem_t item = {sub, 0, ZMQ_POLLIN, 0};
        int ready = zmq_poll(&item, 1, options->idle_ms > 0 ? options->idle_ms : -1);
        if (ready < 0 && errno != EINTR) {
            fprintf(stderr, "tiermem_client: poll on %s failed: %s\n", pub_endpoint, zmq_strerror(errno));
            status = EXIT_NO_REPLY;
            break;
        }
        if (stop_requested) {
            status = EXIT_ANSWERED;
            break;
        }
        subscription.pub_messages += drain_pub(sub);
    }
    fprintf(stderr, "tiermem_client: subscribe printed %lld events and received %lld PUB messages\n",
            subscription.printed, subscription.pub_messages);
    zmq_close(sub);
    return status;
}

/* jansson's json_string() returns NULL for text that is not valid UTF-8. */
static bool check_utf8(const char *what, const char *text)
{
    json_t *string = json_string(text);
    if (string == NULL) {
        fprintf(stderr, "tiermem_client: invalid %s: it is not valid UTF-8\n", what);
        return false;
    }
    json_decref(string);
    return true;
}

static bool add_tag(struct options *options, const char *tag)
{
    if (!check_utf8("--tag", tag)) {
        return false;
    }
    if (options->tags == NULL) {
        options->tags = json_array();
    }
    return json_array_append_new(options->tags, json_string(tag)) == 0;
}

/* Parse the options into `options`; return EXIT_USAGE, or -1 to go on. */
static int parse_options(int argc, char **argv, struct options *options)
{
    enum {
        OPT_IMPORTANCE = 256, OPT_TTL, OPT_EXPECTED_VERSION, OPT_FROM, OPT_COUNT,
        OPT_IDLE_MS, OPT_TIMEOUT_MS, OPT_ATTEMPTS,
    };
    static const struct option long_options[] = {
        {"namespace", required_argument, NULL, 'n'},
        {"id", required_argument, NULL, 'i'},
        {"tag", required_argument, NULL, 't'},
        {"importance", required_argument, NULL, OPT_IMPORTANCE},
        {"ttl", required_argument, NULL, OPT_TTL},
        {"expected-version", required_argument, NULL, OPT_EXPECTED_VERSION},
        {"from", required_argument, NULL, OPT_FROM},
        {"count", required_argument, NULL, OPT_COUNT},
        {"idle-ms", required_argument, NULL, OPT_IDLE_MS},
        {"timeout-ms", required_argument, NULL, OPT_TIMEOUT_MS},
        {"attempts", required_argument, NULL, OPT_ATTEMPTS},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    long long number = 0;
    int option;
    while ((option = getopt_long(argc, argv, "n:i:t:h", long_options, NULL)) != -1) {
        switch (option) {
        case 'n':
            if (!check_utf8("--namespace", optarg)) {
                return EXIT_USAGE;
            }
            options->namespace = optarg;
            break;
        case 'i':
            if (!check_utf8("--id", optarg)) {
                return EXIT_USAGE;
            }
            options->id = optarg;
            break;
        case 't':
            if (!add_tag(options, optarg)) {
                return EXIT_USAGE;
            }
            break;
        case OPT_IMPORTANCE: {
            char *end = NULL;
            errno = 0;
            options->importance = strtod(optarg, &end);
            if (errno != 0 || end == optarg || *end != '\0' || !isfinite(options->importance)) {
                fprintf(stderr, "tiermem_client: invalid --importance %s: expected a number\n", optarg);
                return EXIT_USAGE;
            }
            options->has_importance = true;
            break;
        }
        case OPT_TTL:
            if (!parse_option_number("--ttl", optarg, 1, LLONG_MAX, &options->ttl_s)) {
                return EXIT_USAGE;
            }
            options->has_ttl = true;
            break;
        case OPT_EXPECTED_VERSION:
            if (!parse_option_number("--expected-version", optarg, 0, LLONG_MAX, &options->expected_version)) {
                return EXIT_USAGE;
            }
            options->has_expected_version = true;
            break;
        case OPT_FROM:
            if (!parse_option_number("--from", optarg, 1, LLONG_MAX, &options->from_seq)) {
                return EXIT_USAGE;
            }
            break;
        case OPT_COUNT:
            if (!parse_option_number("--count", optarg, 1, LLONG_MAX, &options->count)) {
                return EXIT_USAGE;
            }
            break;
        case OPT_IDLE_MS:
            if (!parse_option_number("--idle-ms", optarg, 0, INT_MAX, &number)) {
                return EXIT_USAGE;
            }
            options->idle_ms = (long)number;
            break;
        case OPT_TIMEOUT_MS:
            if (!parse_option_number("--timeout-ms", optarg, 1, INT_MAX, &number)) {
                return EXIT_USAGE;
            }
            options->timeout_ms = (long)number;
            break;
        case OPT_ATTEMPTS:
            if (!parse_option_number("--attempts", optarg, 1, 1000, &number)) {
                return EXIT_USAGE;
            }
            options->attempts = (long)number;
            break;
        case 'h':
            usage(stdout);
            exit(EXIT_ANSWERED);
        default:
            usage(stderr);
            return EXIT_USAGE;
        }
    }
    return -1;
}

static int run_command(struct client *client, const char *command, int count, char **args)
{
    bool takes_key = strcmp(command, "subscribe") != 0;
    if (takes_key && count >= 1 && !check_utf8("KEY", args[0])) {
        return EXIT_USAGE;
    }
    if (strcmp(command, "store") == 0 && count == 2) {
        return run_store(client, args[0], args[1]);
    }
    if (strcmp(command, "get") == 0 && count == 1) {
        return run_key_request(client, "Get", args[0]);
    }
    if (strcmp(command, "forget") == 0 && count == 1) {
        return run_key_request(client, "Forget", args[0]);
    }
    if (strcmp(command, "subscribe") == 0 && count == 1) {
        return run_subscribe(client, args[0]);
    }
    fprintf(stderr, "tiermem_client: unknown command or wrong number of arguments: %s\n", command);
    usage(stderr);
    return EXIT_USAGE;
}

int main(int argc, char **argv)
{
    struct options options = {
        .from_seq = 1,
        .timeout_ms = 10000,
        .attempts = 5,
        .idle_ms = 1000,
    };
    int status = parse_options(argc, argv, &options);
    if (status >= 0) {
        json_decref(options.tags);
        return status;
    }
    if (argc - optind < 2) {
        usage(stderr);
        json_decref(options.tags);
        return EXIT_USAGE;
    }
    const char *command = argv[optind];
    const char *endpoint = argv[optind + 1];

    setvbuf(stdout, NULL, _IOLBF, 0);
    install_signal_handlers();
    struct client client = {zmq_ctx_new(), NULL, endpoint, &options};
    client.dealer = zmq_socket(client.context, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(client.dealer, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(client.dealer, endpoint) != 0) {
        fprintf(stderr, "tiermem_client: invalid lane endpoint %s: %s\n", endpoint, zmq_strerror(errno));
        status = EXIT_USAGE;
    } else {
        status = run_command(&client, command, argc - optind - 2, argv + optind + 2);
    }
    zmq_close(client.dealer);
    zmq_ctx_term(client.context);
    json_decref(options.tags);
    return status;
}
