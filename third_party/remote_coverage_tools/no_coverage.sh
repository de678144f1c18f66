#!/bin/sh
echo "bazel coverage is not supported offline (no coverage tools); run the tests with ./run_tests.sh" >&2
exit 1
