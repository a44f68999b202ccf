/* The NFQUEUE mechanism's limit, for bench/modes.py: a C consumer that binds a queue with the
 * flags nfacct sets (128-byte copy, 8192 packets, 8 MiB socket buffer, GSO | FAIL_OPEN | UID_GID)
 * and accepts every packet as soon as it has read it, in batches the way nfacct's reader does
 * (up to 64 packets read without waiting, then one NFQNL_MSG_VERDICT_BATCH): the same kernel
 * round trips, without parsing, attribution or Python.
 *
 *   ip netns exec NS nfq_consumer QUEUE
 *
 * Prints {"ready": true} once bound and configured, and on SIGTERM or SIGINT a JSON line with
 * the packets it accepted and its own CPU seconds. Build: gcc -O2 nfq_consumer.c
 * -lnetfilter_queue -lnfnetlink (libnetfilter-queue-dev).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

#define COPY_RANGE 128
#define QUEUE_MAXLEN 8192
#define RCVBUF (8 << 20)
#define BATCH 64

static volatile sig_atomic_t stopping;
static uint64_t packets;
static uint32_t newest;

static void on_signal(int sig) {
	(void)sig;
	stopping = 1;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data) {
	(void)qh, (void)msg, (void)data;
	struct nfqnl_msg_packet_hdr *hdr = nfq_get_msg_packet_hdr(nfa);
	if (hdr != NULL) {
		newest = ntohl(hdr->packet_id);
		packets++;
	}
	return 0;
}

static double cpu_seconds(void) {
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void die(const char *what) {
	fprintf(stderr, "nfq_consumer: %s: %s\n", what, strerror(errno));
	exit(1);
}

int main(int argc, char **argv) {
	if (argc != 2) {
		fprintf(stderr, "usage: nfq_consumer QUEUE\n");
		return 2;
	}
	uint16_t number = (uint16_t)atoi(argv[1]);
	/* No SA_RESTART: a signal must interrupt the blocking recv. */
	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	struct nfq_handle *h = nfq_open();
	if (h == NULL)
		die("nfq_open");
	struct nfq_q_handle *qh = nfq_create_queue(h, number, on_packet, NULL);
	if (qh == NULL)
		die("binding the queue");
	uint32_t flags = NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_UID_GID;
	if (nfq_set_mode(qh, NFQNL_COPY_PACKET, COPY_RANGE) < 0)
		die("copy range");
	if (nfq_set_queue_maxlen(qh, QUEUE_MAXLEN) < 0)
		die("queue length");
	if (nfq_set_queue_flags(qh, flags, flags) < 0)
		die("queue flags");
	nfnl_rcvbufsiz(nfq_nfnlh(h), RCVBUF);
	int fd = nfq_fd(h);
	printf("{\"ready\": true}\n");
	fflush(stdout);

	static char buf[1 << 16];
	uint64_t batches = 0, enobufs = 0;
	while (!stopping) {
		int read = 0;
		while (read < BATCH) {
			ssize_t n = recv(fd, buf, sizeof buf, read ? MSG_DONTWAIT : 0);
			if (n < 0) {
				if (errno == ENOBUFS) /* lost to a full socket buffer: FAIL_OPEN passed them */
					enobufs++;
				else if (errno != EINTR && errno != EAGAIN)
					die("recv");
				break;
			}
			nfq_handle_packet(h, buf, (int)n);
			read++;
		}
		if (read) {
			nfq_set_verdict_batch(qh, newest, NF_ACCEPT);
			batches++;
		}
	}
	printf("{\"packets\": %llu, \"verdict_batches\": %llu, \"enobufs\": %llu, \"cpu_s\": %.3f}\n",
	       (unsigned long long)packets, (unsigned long long)batches, (unsigned long long)enobufs,
	       cpu_seconds());
	fflush(stdout);
	nfq_destroy_queue(qh);
	nfq_close(h);
	return 0;
}
