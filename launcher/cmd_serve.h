/* cmd_serve.h - the `cparallel serve` subcommand: loads a model and serves
 * it over an OpenAI-compatible HTTP API until SIGTERM/SIGINT. */
#ifndef CP_CMD_SERVE_H
#define CP_CMD_SERVE_H

/* argv[1] is "serve"; options start at argv[2]. Returns the process exit
 * code: 0 after a clean drain (or --help), 1 runtime error (model, bind,
 * scheduler failure), 2 usage error (one line on stderr). */
int cp_cli_serve(int argc, char **argv);

#endif /* CP_CMD_SERVE_H */
