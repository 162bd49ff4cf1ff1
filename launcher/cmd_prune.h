/* cmd_prune.h - `cparallel prune`: a GGUF model with weights zeroed
 * (unstructured or 2:4) or layers, heads and MLP channels removed, written
 * only when its measured accuracy loss is within the bound. */
#ifndef CP_CMD_PRUNE_H
#define CP_CMD_PRUNE_H

int cp_cli_prune(int argc, char **argv);

#endif /* CP_CMD_PRUNE_H */
