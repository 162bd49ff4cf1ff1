/* cmd_eval.h - `cparallel eval`: perplexity of a model on a text, and its
 * distance from a reference model. */
#ifndef CP_CMD_EVAL_H
#define CP_CMD_EVAL_H

int cp_cli_eval(int argc, char **argv);

#endif /* CP_CMD_EVAL_H */
