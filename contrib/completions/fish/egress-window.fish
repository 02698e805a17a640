complete -c egress-window -l to -d 'Only to these destinations (names resolved when the window opens, IPv4 and IPv6)' -r
complete -c egress-window -l socket -d 'The daemon\'s admin socket' -r -F
complete -c egress-window -l host-wide -d 'Open egress for every process on the host, not just COMMAND'
complete -c egress-window -s h -l help -d 'Print help'
complete -c egress-window -s V -l version -d 'Print version'
