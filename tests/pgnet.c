/* A static TCP client and server for container images made without a registry (tests/images.py builds it).
 * Debian 12's static busybox wget/nc segfault inside podman 4.3.1 containers (exit 139); this does not.
 *
 *   pgnet connect HOST PORT [COUNT]   COUNT connections (default 1); prints "SRCPORT" per connection; exit 0
 *                                     when every one got an answer, 1 otherwise
 *   pgnet serve PORT                  accepts forever; prints "PEERADDR PEERPORT" per connection, answers "ok"
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int one(const char *host, const char *port) {
    /* Numeric addresses only: no resolver in a static binary. */
    struct sockaddr_storage to = {0};
    socklen_t tolen;
    struct sockaddr_in *v4 = (struct sockaddr_in *)&to;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&to;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET, v4->sin_port = htons(atoi(port)), tolen = sizeof *v4;
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6, v6->sin6_port = htons(atoi(port)), tolen = sizeof *v6;
    } else {
        return 0;
    }
    int fd = socket(to.ss_family, SOCK_STREAM, 0);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int ok = fd >= 0 && connect(fd, (struct sockaddr *)&to, tolen) == 0;
    if (ok) {
        struct sockaddr_storage me;
        socklen_t len = sizeof me;
        getsockname(fd, (struct sockaddr *)&me, &len);
        int sport = me.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&me)->sin_port)
                                             : ntohs(((struct sockaddr_in6 *)&me)->sin6_port);
        const char req[] = "GET / HTTP/1.0\r\n\r\n";
        char buf[256];
        ok = write(fd, req, sizeof req - 1) > 0 && read(fd, buf, sizeof buf) > 0;
        printf("%d\n", sport);
        fflush(stdout);
    }
    if (fd >= 0) close(fd);
    return ok;
}

static int serve(const char *port) {
    int fd = socket(AF_INET6, SOCK_STREAM, 0), zero = 0, yes = 1;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    struct sockaddr_in6 addr = {0};
    addr.sin6_family = AF_INET6;
    addr.sin6_port = htons(atoi(port));
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 64) != 0) return 1;
    for (;;) {
        struct sockaddr_in6 peer;
        socklen_t len = sizeof peer;
        int c = accept(fd, (struct sockaddr *)&peer, &len);
        if (c < 0) continue;
        char text[INET6_ADDRSTRLEN];
        inet_ntop(AF_INET6, &peer.sin6_addr, text, sizeof text);
        printf("%s %d\n", strncmp(text, "::ffff:", 7) == 0 ? text + 7 : text, ntohs(peer.sin6_port));
        fflush(stdout);
        const char answer[] = "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
        if (write(c, answer, sizeof answer - 1) < 0) perror("write");
        close(c);
    }
}

int main(int argc, char **argv) {
    if (argc >= 4 && strcmp(argv[1], "connect") == 0) {
        int count = argc > 4 ? atoi(argv[4]) : 1, good = 0;
        for (int i = 0; i < count; i++) good += one(argv[2], argv[3]);
        return good == count ? 0 : 1;
    }
    if (argc == 3 && strcmp(argv[1], "serve") == 0) return serve(argv[2]);
    fprintf(stderr, "usage: pgnet connect HOST PORT [COUNT] | pgnet serve PORT\n");
    return 2;
}
