# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).

# Print a command the way a user would type it: words with shell-special characters single-quoted.
show_cmd() {
  local out=() word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}
