/* cmd_synth.h - the `cparallel synth` subcommand: writes a random-weight
 * Hugging Face checkpoint of a real architecture's shapes for benchmarks. */
#ifndef CP_CMD_SYNTH_H
#define CP_CMD_SYNTH_H

/* argv[1] is "synth"; options start at argv[2]. Returns the process exit
 * code: 0 done (or --help), 1 runtime error (e.g. disk full), 2 usage error
 * (one line on stderr). */
int cp_cli_synth(int argc, char **argv);

#endif /* CP_CMD_SYNTH_H */
