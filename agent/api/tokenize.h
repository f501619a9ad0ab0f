/* vLLM's tokenizer endpoints on the public port (docs/api.md):
 *
 *   POST /tokenize    {"model", "prompt", "add_special_tokens"?,
 *                      "return_token_strs"?}
 *                  or {"model", "messages", "add_generation_prompt"?,
 *                      "add_special_tokens"?, "return_token_strs"?}
 *                  -> {"count", "max_model_len", "tokens", "token_strs"?}
 *   POST /detokenize  {"model", "tokens"} -> {"prompt"}
 *
 * The prompt is tokenized exactly as a completion or chat request with the
 * same fields would be (request.h builds both). `model` picks the base
 * model or an adapter as generation does (an unknown name is 404
 * model_not_found, or loaded by --lora-resolver); adapters share the base
 * model's tokenizer, so the answer does not depend on which. Each handler
 * returns the HTTP status it sent. */
#ifndef LP_API_TOKENIZE_H
#define LP_API_TOKENIZE_H

#include "agent/api/server.h"

int lp_tokenize(struct lp_call *c);
int lp_detokenize(struct lp_call *c);

#endif
