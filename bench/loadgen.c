/* Traffic for bench/modes.py, in C so that the harness is not what it measures.
 *
 *   loadgen udp ADDR PORT SOCKETS SECONDS SIZE    flood: SOCKETS connected UDP sockets (one source
 *                                                 port each) send SIZE-byte datagrams in turn
 *   loadgen connections ADDR PORT SECONDS CONCURRENCY SIZE [dry]
 *                                                 one child process per TCP connection, at most
 *                                                 CONCURRENCY at once (dry: children exit at once,
 *                                                 no network: the harness's own ceiling)
 *   loadgen latency ADDR PORT COUNT FRESH         connect to first echoed byte: COUNT connections
 *                                                 from this process, then FRESH new processes
 *                                                 (fork + exec) of one connection each; times
 *                                                 in ms, a failed connection as minus its step
 *   loadgen once ADDR PORT                        one timed connection (what `latency` execs)
 *   loadgen hold ADDR PORT COUNT RATE LOCAL FIRST COUNT UDP sockets bound to LOCAL, ports from
 *                                                 FIRST up (skipping ports in use), each sends
 *                                                 one datagram (RATE per second), all kept open
 *                                                 until stdin closes
 *   loadgen echo PORT                             TCP server: echoes one read, then closes
 *   loadgen sink PORT                             UDP socket that receives and never reads
 *
 * A connection (connections, latency) sends SIZE bytes (latency: 1), reads the echo, then waits
 * for the server's close before closing its end: the server closes first, so the client's ports
 * never sit in TIME_WAIT and thousands of connections per second do not run out of them.
 * Every command but the servers prints one JSON line with what it did; the servers print
 * {"ready": true} and run until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
	fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in address(const char *ip, int port) {
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) {
		fprintf(stderr, "loadgen: not an IPv4 address: %s\n", ip);
		exit(2);
	}
	return sa;
}

static void raise_nofile(rlim_t want) {
	struct rlimit rl = {want, want};
	if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
		die("RLIMIT_NOFILE");
}

/* ---- udp flood ------------------------------------------------------------------------------ */

static int udp(const char *ip, int port, int nsock, double seconds, int size) {
	struct sockaddr_in to = address(ip, port);
	raise_nofile((rlim_t)nsock + 64);
	int *fds = calloc((size_t)nsock, sizeof *fds);
	for (int i = 0; i < nsock; i++) {
		fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
		if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&to, sizeof to) < 0)
			die("udp socket");
	}
	char payload[65536] = {0};
	memset(payload, 'u', (size_t)size);
	uint64_t sent = 0, failed = 0;
	double start = now(), end = start + seconds, t = start;
	for (int i = 0; t < end; i = (i + 1) % nsock, t = now()) {
		if (send(fds[i], payload, (size_t)size, 0) == size)
			sent++;
		else
			failed++;
	}
	printf("{\"pid\": %d, \"sent\": %llu, \"failed\": %llu, \"seconds\": %.6f}\n", getpid(),
	       (unsigned long long)sent, (unsigned long long)failed, t - start);
	return 0;
}

/* ---- one TCP connection --------------------------------------------------------------------- */

/* Connect, send `size` bytes, read their echo, wait for the server's close. Returns 0 or the
 * step that failed; *took gets the seconds from connect() to the first echoed byte. */
static int exchange(const struct sockaddr_in *to, int size, double *took) {
	char buf[512];
	memset(buf, 'c', sizeof buf);
	int fd = socket(AF_INET, SOCK_STREAM, 0), failed = 0, got = 0;
	if (fd < 0)
		return 1;
	struct timeval tv = {5, 0};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	double start = now();
	if (connect(fd, (const struct sockaddr *)to, sizeof *to) < 0)
		failed = 2;
	else if (send(fd, buf, (size_t)size, 0) != size)
		failed = 3;
	while (!failed && got < size) {
		ssize_t n = recv(fd, buf, sizeof buf, 0);
		if (n <= 0)
			failed = 4;
		else if (got == 0 && took != NULL)
			*took = now() - start;
		got += (int)n;
	}
	if (!failed && recv(fd, buf, sizeof buf, 0) != 0)
		failed = 5;
	close(fd);
	return failed;
}

/* ---- connections per second from short-lived processes ------------------------------------- */

static int connections(const char *ip, int port, double seconds, int concurrency, int size, int dry) {
	struct sockaddr_in to = address(ip, port);
	size_t cap = 1 << 16, n = 0;
	pid_t *children = malloc(cap * sizeof *children);
	uint64_t ok = 0, failed = 0;
	int running = 0, status;
	double start = now(), end = start + seconds;
	while (now() < end || running) {
		if (running == concurrency || (running && now() >= end)) {
			if (wait(&status) < 0)
				die("wait");
			running--;
			if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
				ok++;
			else
				failed++;
			continue;
		}
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0)
			_exit(dry ? 0 : exchange(&to, size, NULL));
		if (n == cap)
			children = realloc(children, (cap *= 2) * sizeof *children);
		children[n++] = pid;
		running++;
	}
	double took = now() - start;
	printf("{\"pid\": %d, \"connections\": %llu, \"failed\": %llu, \"seconds\": %.6f, \"children\": [",
	       getpid(), (unsigned long long)ok, (unsigned long long)failed, took);
	for (size_t i = 0; i < n; i++)
		printf(i ? ", %d" : "%d", children[i]);
	printf("]}\n");
	return 0;
}

/* ---- connect to first byte ------------------------------------------------------------------ */

static int once(const char *ip, int port) {
	struct sockaddr_in to = address(ip, port);
	double took = 0;
	int failed = exchange(&to, 1, &took);
	printf("%.9f\n", failed ? -failed : took);
	return 0;
}

static int latency(const char *self, const char *ip, int port, int count, int fresh) {
	struct sockaddr_in to = address(ip, port);
	printf("{\"pid\": %d, \"long_lived_ms\": [", getpid());
	for (int i = 0; i < count; i++) {
		double took = 0;
		int failed = exchange(&to, 1, &took);
		printf(i ? ", %.4f" : "%.4f", failed ? -failed : took * 1e3);
		usleep(2000);
	}
	printf("], \"fresh_ms\": [");
	fflush(stdout);
	char portbuf[16];
	snprintf(portbuf, sizeof portbuf, "%d", port);
	pid_t *children = calloc((size_t)fresh + 1, sizeof *children);
	for (int i = 0; i < fresh; i++) {
		int pipefd[2];
		if (pipe(pipefd) < 0)
			die("pipe");
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0) {
			dup2(pipefd[1], 1);
			execl(self, "loadgen", "once", ip, portbuf, (char *)NULL);
			_exit(127);
		}
		close(pipefd[1]);
		char line[64] = {0};
		ssize_t n = read(pipefd[0], line, sizeof line - 1);
		close(pipefd[0]);
		waitpid(pid, NULL, 0);
		children[i] = pid;
		double took = n > 0 ? atof(line) : -9;
		printf(i ? ", %.4f" : "%.4f", took < 0 ? took : took * 1e3);
		usleep(2000);
	}
	printf("], \"children\": [");
	for (int i = 0; i < fresh; i++)
		printf(i ? ", %d" : "%d", children[i]);
	printf("]}\n");
	return 0;
}

/* ---- many concurrent flows ------------------------------------------------------------------ */

static int hold(const char *ip, int port, int count, double rate, const char *local, int first_port) {
	struct sockaddr_in to = address(ip, port);
	raise_nofile((rlim_t)count + 64);
	int *fds = calloc((size_t)count, sizeof *fds);
	int opened = 0;
	uint64_t busy = 0;
	double start = now();
	for (int lport = first_port; opened < count && lport < 65536; lport++) {
		struct sockaddr_in from = address(local, lport);
		int fd = socket(AF_INET, SOCK_DGRAM, 0);
		if (fd < 0)
			die("socket");
		if (bind(fd, (struct sockaddr *)&from, sizeof from) < 0) {
			if (errno != EADDRINUSE)
				die("bind");
			busy++; /* someone else's port: the next one */
			close(fd);
			continue;
		}
		if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0)
			die("connect");
		fds[opened++] = fd;
	}
	double open_s = now() - start;
	uint64_t sent = 0;
	start = now();
	for (int i = 0; i < opened; i++) {
		double due = start + i / rate;
		double wait = due - now();
		if (wait > 0)
			usleep((useconds_t)(wait * 1e6));
		if (send(fds[i], "h", 1, 0) == 1)
			sent++;
	}
	printf("{\"pid\": %d, \"sockets\": %d, \"ports_in_use\": %llu, \"open_seconds\": %.3f, \"sent\": %llu, "
	       "\"send_seconds\": %.3f}\n",
	       getpid(), opened, (unsigned long long)busy, open_s, (unsigned long long)sent, now() - start);
	fflush(stdout);
	char drain[256];
	while (read(0, drain, sizeof drain) > 0)
		;
	return 0; /* exit closes every socket */
}

/* ---- servers -------------------------------------------------------------------------------- */

static int listener(int type, int port) {
	int fd = socket(AF_INET, type | SOCK_NONBLOCK, 0), one = 1;
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		die("bind");
	if (type == SOCK_STREAM && listen(fd, 4096) < 0)
		die("listen");
	return fd;
}

static _Noreturn void echo(int port) {
	int srv = listener(SOCK_STREAM, port), ep = epoll_create1(0);
	struct epoll_event ev = {.events = EPOLLIN, .data.fd = srv}, events[256];
	epoll_ctl(ep, EPOLL_CTL_ADD, srv, &ev);
	printf("{\"ready\": true}\n");
	fflush(stdout);
	char buf[4096];
	for (;;) {
		int n = epoll_wait(ep, events, 256, -1);
		for (int i = 0; i < n; i++) {
			int fd = events[i].data.fd;
			if (fd == srv) {
				int c;
				while ((c = accept4(srv, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					ev.data.fd = c;
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
				}
				continue;
			}
			ssize_t got = recv(fd, buf, sizeof buf, 0);
			if (got < 0 && errno == EAGAIN)
				continue;
			if (got > 0 && send(fd, buf, (size_t)got, 0) < 0)
				fprintf(stderr, "loadgen echo: send: %s\n", strerror(errno));
			close(fd); /* first: the client's port never waits in TIME_WAIT */
		}
	}
}

static _Noreturn void sink(int port) {
	listener(SOCK_DGRAM, port);
	printf("{\"ready\": true}\n");
	fflush(stdout);
	for (;;)
		pause();
}

int main(int argc, char **argv) {
	const char *cmd = argc > 1 ? argv[1] : "";
	signal(SIGPIPE, SIG_IGN);
	if (!strcmp(cmd, "udp") && argc == 7)
		return udp(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atoi(argv[6]));
	if (!strcmp(cmd, "connections") && (argc == 7 || (argc == 8 && !strcmp(argv[7], "dry"))))
		return connections(argv[2], atoi(argv[3]), atof(argv[4]), atoi(argv[5]), atoi(argv[6]), argc == 8);
	if (!strcmp(cmd, "latency") && argc == 6)
		return latency("/proc/self/exe", argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
	if (!strcmp(cmd, "once") && argc == 4)
		return once(argv[2], atoi(argv[3]));
	if (!strcmp(cmd, "hold") && argc == 8)
		return hold(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]), argv[6], atoi(argv[7]));
	if (!strcmp(cmd, "echo") && argc == 3)
		echo(atoi(argv[2]));
	if (!strcmp(cmd, "sink") && argc == 3)
		sink(atoi(argv[2]));
	fprintf(stderr, "usage: see the comment at the top of bench/loadgen.c\n");
	return 2;
}
