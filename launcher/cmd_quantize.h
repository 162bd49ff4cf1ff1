/* cmd_quantize.h - `cparallel quantize`: a GGUF model rewritten in a
 * smaller weight type, written only when its measured accuracy loss is
 * within the bound. */
#ifndef CP_CMD_QUANTIZE_H
#define CP_CMD_QUANTIZE_H

int cp_cli_quantize(int argc, char **argv);

#endif /* CP_CMD_QUANTIZE_H */
