/* loraplane-agent fetch URI DEST: downloads a base model (s3://, hf://,
 * https://, file://; docs/model-fetch.md) into the directory DEST, as an
 * init container does before the agent starts with --model DEST. Written
 * in agent/fetch.c. */
#ifndef LP_AGENT_FETCH_H
#define LP_AGENT_FETCH_H

/* The subcommand's main(): argv[0] is "fetch", the rest its arguments.
 * Returns the process's exit status. */
int lp_fetch_main(int argc, char **argv);

#endif
