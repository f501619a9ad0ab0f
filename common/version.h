/* The version every loraplane program prints for --version and logs at
 * startup: the VERSION file's number, and " (git <describe>)" when built
 * from a git checkout. The Makefile defines LP_VERSION for the objects that
 * include this header; a build without it gets the number alone (keep it
 * equal to VERSION: tests/integration/test-cli.py checks). */
#ifndef LP_COMMON_VERSION_H
#define LP_COMMON_VERSION_H

#ifndef LP_VERSION
#define LP_VERSION "0.1.0"
#endif

#endif
