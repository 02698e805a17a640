complete -c knockgated -l config -d 'Config file' -r -F
complete -c knockgated -l log-format -d 'Log lines as text or as JSON objects (for log shippers)' -r -f -a "text\t'`LEVEL target: message key=value …`'
json\t'One JSON object per line, fields included'"
complete -c knockgated -l check -d 'Validate the config and print the ruleset it would apply; change nothing'
complete -c knockgated -s h -l help -d 'Print help (see more with \'--help\')'
complete -c knockgated -s V -l version -d 'Print version'
