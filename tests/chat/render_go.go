// Renders Go text/template cases as Ollama executes chat templates (missingkey=zero; .System, .Messages of
// api.Message-like structs). Reads a JSON list of {"template", "system", "messages"} on stdin and writes a
// JSON list of {"out"} or {"error"}: the reference for qmerge/chat/gotemplate.py in tests.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role      string
	Content   string
	Thinking  string
	Images    []string
	ToolCalls []any
	ToolName  string
}

type Case struct {
	Template string `json:"template"`
	System   string `json:"system"`
	Messages []struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"messages"`
}

type Result struct {
	Out   *string `json:"out,omitempty"`
	Error string  `json:"error,omitempty"`
}

func render(c Case) Result {
	t, err := template.New("").Option("missingkey=zero").Parse(c.Template)
	if err != nil {
		return Result{Error: err.Error()}
	}
	msgs := []*Message{}
	for _, m := range c.Messages {
		msgs = append(msgs, &Message{Role: m.Role, Content: m.Content})
	}
	var b bytes.Buffer
	data := map[string]any{"System": c.System, "Messages": msgs, "Tools": nil, "Response": "", "Think": false}
	if err := t.Execute(&b, data); err != nil {
		return Result{Error: err.Error()}
	}
	s := b.String()
	return Result{Out: &s}
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []Result{}
	for _, c := range cases {
		out = append(out, render(c))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
