/* cli_optimize.h - shared parts of `cparallel quantize` and `cparallel prune`. */
#ifndef CP_CLI_OPTIMIZE_H
#define CP_CLI_OPTIMIZE_H

#include <stdbool.h>
#include <stddef.h>

#include "cp_quantize.h"

/* A chapter of the Python tutorial from Debian's python3-doc (English prose
 * nobody on this project wrote) into path[cap], or NULL when it is not
 * installed. Evaluation uses "appetite"; calibration "controlflow". */
const char *cli_tutorial_chapter(const char *chapter, char *path, size_t cap);

/* Activation statistics of model over the first `tokens` tokens of the
 * file calib; 0 on success (errors reported as `cparallel cmd: ...`). */
int cli_calibrate(const char *cmd, const char *model, const char *calib, int tokens, int threads,
                  cp_act_stats **out);

/* Progress on stderr every 10%: pass a cli_write_progress_state as the user. */
typedef struct cli_write_progress_state {
    const char *cmd;
    int last;
} cli_write_progress_state;
void cli_write_progress(void *user, size_t done, size_t total);

/* Measures the model at cand against orig on the text (perplexity, KL,
 * top-1 agreement, printed); *increase gets the relative perplexity rise.
 * Returns 0 when it may be kept, 3 when the rise exceeds max_increase (a
 * fraction) and !force, 1 on errors. */
int cli_measure(const char *cmd, const char *orig, const char *cand, const char *text, int ctx, int max_tokens,
                int threads, double max_increase, bool force, double *increase);

#endif /* CP_CLI_OPTIMIZE_H */
