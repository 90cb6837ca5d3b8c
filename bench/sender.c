/*
 * A netconsole-like load generator that is not the bottleneck: extended-format datagrams of
 * about 120 bytes, from N source addresses in 127.0.0.0/8, paced to a rate, sent with sendmmsg.
 *
 * usage: sender PORT RATE SECONDS SOURCES [lines|plain|fragments] [FIRST_SOURCE]
 * "lines" (the default) sends extended-format lines, "plain" plain-format ones as netconsole
 * sends them without "+" ("[seconds.micros] text"). With "fragments", every datagram is the
 * first fragment of a message that never completes (to show the reassembly bounds).
 * prints: "sent N datagrams in S seconds" on stdout.
 * Source i is 127.(1 + i / 65536).((i / 256) % 256).(i % 256 + 1 avoiding .0/.255 clashes).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32
/* Ordinary lines of a busy Tempesta FW server, in turn (none of them starts an incident). */
static const char *LINES[] = {
	"tfw_http_msg_process: [tempesta fw] request processed for client 192.0.2.77 status 200",
	"[tempesta fw] Starting virtual host 'default' listening on 0.0.0.0:443, 64 worker threads",
	"nf_conntrack: nf_conntrack: table full, dropping packet from 192.0.2.77 to 198.51.100.5",
	"TCP: request_sock_TCP: Possible SYN flooding on port 443. Sending cookies.  Check SNMP counters.",
};
#define NLINES (sizeof(LINES) / sizeof(LINES[0]))

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void source_address(long i, struct sockaddr_in *sa)
{
	memset(sa, 0, sizeof(*sa));
	sa->sin_family = AF_INET;
	/* 127.1.0.1 onwards; the last octet stays in 1..250 */
	long host = i % 250 + 1, mid = (i / 250) % 250, high = 1 + i / (250 * 250);
	sa->sin_addr.s_addr = htonl((127u << 24) | (high << 16) | (mid << 8) | host);
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: %s PORT RATE SECONDS SOURCES\n", argv[0]);
		return 2;
	}
	int port = atoi(argv[1]);
	double rate = atof(argv[2]), seconds = atof(argv[3]);
	long sources = atol(argv[4]);
	int fragments = argc > 5 && strcmp(argv[5], "fragments") == 0;
	int plain = argc > 5 && strcmp(argv[5], "plain") == 0;
	long first = argc > 6 ? atol(argv[6]) : 0;
	struct rlimit rl = { sources + 64, sources + 64 };
	if (setrlimit(RLIMIT_NOFILE, &rl) && sources > 1000)
		perror("setrlimit");
	int *fds = calloc(sources, sizeof(int));
	unsigned long *seqs = calloc(sources, sizeof(unsigned long));
	for (long i = 0; i < sources; i++) {
		struct sockaddr_in sa;
		source_address(first + i, &sa);
		fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
		int big = 4 << 20;
		setsockopt(fds[i], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
		if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&sa, sizeof(sa))) {
			perror("socket/bind");
			return 1;
		}
	}
	struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons(port) };
	dst.sin_addr.s_addr = htonl(0x7f000001);
	static char bufs[BATCH][256];
	struct mmsghdr msgs[BATCH];
	struct iovec iovs[BATCH];
	long sent = 0, source = 0;
	double start = now(), end = start + seconds;
	while (1) {
		double t = now();
		if (t >= end)
			break;
		long due = (long)((t - start) * rate);
		if (sent >= due) {
			struct timespec ts = { 0, 50000 };
			nanosleep(&ts, NULL);
			continue;
		}
		int n = due - sent < BATCH ? (int)(due - sent) : BATCH;
		for (int k = 0; k < n; k++) {
			unsigned long usec = (unsigned long)((t - start) * 1e6);
			int len = plain ?
				snprintf(bufs[k], sizeof(bufs[k]), "[%5lu.%06lu] %s\n", usec / 1000000,
					 usec % 1000000, LINES[seqs[source] % NLINES]) :
				snprintf(bufs[k], sizeof(bufs[k]),
					 fragments ? "6,%lu,%lu,-,ncfrag=0/60000;%s" : "6,%lu,%lu,-;%s\n",
					 seqs[source], usec, LINES[seqs[source] % NLINES]);
			seqs[source]++;
			iovs[k].iov_base = bufs[k];
			iovs[k].iov_len = len;
			memset(&msgs[k], 0, sizeof(msgs[k]));
			msgs[k].msg_hdr.msg_name = &dst;
			msgs[k].msg_hdr.msg_namelen = sizeof(dst);
			msgs[k].msg_hdr.msg_iov = &iovs[k];
			msgs[k].msg_hdr.msg_iovlen = 1;
		}
		int done = sendmmsg(fds[source], msgs, n, 0);
		if (done < 0) {
			if (errno == EAGAIN || errno == ENOBUFS)
				continue;
			perror("sendmmsg");
			return 1;
		}
		/* a sent message used a sequence number; unsent ones are re-numbered next time */
		seqs[source] -= n - done;
		sent += done;
		source = (source + 1) % sources;
	}
	printf("sent %ld datagrams in %.3f seconds\n", sent, now() - start);
	return 0;
}
