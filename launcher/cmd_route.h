/* cmd_route.h - the `cparallel route` subcommand: the multi-region
 * failover router in front of several `cparallel serve` deployments. */
#ifndef CP_CMD_ROUTE_H
#define CP_CMD_ROUTE_H

/* argv[1] is "route"; options start at argv[2]. Returns the process exit
 * code: 0 after a clean stop on SIGTERM/SIGINT (or --help), 1 runtime
 * error (bind), 2 usage error (one line on stderr). */
int cp_cli_route(int argc, char **argv);

#endif /* CP_CMD_ROUTE_H */
