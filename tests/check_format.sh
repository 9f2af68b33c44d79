#!/usr/bin/env bash
# Fails, naming them, when tracked C++/CUDA sources differ from clang-format's output (Google
# style, .clang-format at the root). `clang-format -i FILE` fixes one.
set -uo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null || { echo "check_format: clang-format is not installed"; exit 1; }
unformatted=()
while IFS= read -r file; do
  clang-format --dry-run --Werror "$file" >/dev/null 2>&1 || unformatted+=("$file")
done < <(git ls-files '*.cc' '*.h' '*.cu')
if [ ${#unformatted[@]} -gt 0 ]; then
  echo "check_format: ${#unformatted[@]} files need clang-format -i: ${unformatted[*]}"
  exit 1
fi
echo "check_format: $(git ls-files '*.cc' '*.h' '*.cu' | wc -l) files formatted"
