/* `loraplane-operator cleanup`: what the Helm chart's pre-delete hook runs
 * while the operator still runs, so that uninstalling does not strand
 * LoraAdapters behind the `loraplane.io/unload` finalizer that only the
 * operator removes (docs/operator.md, "Uninstalling"). */
#ifndef LP_OPERATOR_CLEANUP_H
#define LP_OPERATOR_CLEANUP_H

/* The subcommand's main: argv[0] is "cleanup", the rest its flags
 * (borrowed). Deletes every LoraAdapter in scope, waits (with a watch) for
 * the running operator to unload them and let them go, and after
 * --timeout removes the finalizer itself. Logs to stderr; returns the
 * process's exit status: 0 when no LoraAdapter is left in scope (or the
 * CRD is not installed), 1 on failure, 2 on bad usage. */
int lp_cleanup_main(int argc, char **argv);

#endif
