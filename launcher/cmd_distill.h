/* cmd_distill.h - `cparallel distill`: a teacher's continuations of a
 * prompts file and its top-k log-probabilities, for logit distillation. */
#ifndef CP_CMD_DISTILL_H
#define CP_CMD_DISTILL_H

int cp_cli_distill(int argc, char **argv);

#endif /* CP_CMD_DISTILL_H */
